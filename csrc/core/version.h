// Version of the binary interface between alignkit's Python layer and the compiled
// extension. Bump it whenever a binding changes signature or meaning; alignkit/_ext.py
// holds the same number and refuses to load a stale build.
#pragma once

#define ALIGNKIT_EXT_ABI 3
