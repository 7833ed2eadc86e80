// pybind11 bindings: translation only, no logic. The core lives in csrc/core/.
//
// GIL: every call into a ReplayBuffer method releases the GIL first (the core's mutex is
// always taken without the GIL; the core never calls back into Python), so producers and
// consumers run their copies in parallel with other Python threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/build_info.h"
#include "core/replay_buffer.h"
#include "core/token_budget.h"
#include "core/version.h"

namespace py = pybind11;

namespace {

using alignkit::Batch;
using alignkit::DType;
using alignkit::ReplayBuffer;

py::dtype numpy_dtype(DType dtype) { return py::dtype(alignkit::dtype_name(dtype)); }

// A NumPy array that owns `buffer` (freed when the array dies): zero-copy hand-off.
py::array owned_array(alignkit::OwnedBuffer& buffer, const py::dtype& dtype, std::vector<py::ssize_t> shape) {
  uint8_t* data = buffer.release();
  py::capsule owner(data, [](void* p) { std::free(p); });
  return py::array(dtype, std::move(shape), data, owner);
}

template <typename T>
py::array_t<T> vector_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

py::dict batch_to_dict(Batch& batch, const alignkit::Schema& schema) {
  const auto B = static_cast<py::ssize_t>(batch.ids.size());
  py::dict out;
  out["ids"] = vector_array(batch.ids);
  out["lengths"] = vector_array(batch.lengths);
  out["max_length"] = batch.max_length;
  out["total_tokens"] = batch.total_tokens;
  if (!batch.weights.empty()) {
    std::vector<float> w(batch.weights.begin(), batch.weights.end());
    out["weights"] = vector_array(w);
  }
  if (batch.ids_only) return out;
  py::list token_fields, sequence_fields;
  for (size_t f = 0; f < batch.token_fields.size(); ++f) {
    const py::dtype dt = numpy_dtype(schema.token_fields[f].dtype);
    if (batch.layout == alignkit::Layout::kPadded) {
      token_fields.append(owned_array(batch.token_fields[f], dt, {B, static_cast<py::ssize_t>(batch.max_length)}));
    } else {
      token_fields.append(owned_array(batch.token_fields[f], dt, {static_cast<py::ssize_t>(batch.total_tokens)}));
    }
  }
  for (size_t f = 0; f < batch.sequence_fields.size(); ++f) {
    sequence_fields.append(owned_array(batch.sequence_fields[f], numpy_dtype(schema.sequence_fields[f].dtype), {B}));
  }
  out["token_fields"] = token_fields;
  out["sequence_fields"] = sequence_fields;
  if (batch.layout == alignkit::Layout::kPadded) {
    out["attention_mask"] =
        owned_array(batch.attention_mask, py::dtype("bool"), {B, static_cast<py::ssize_t>(batch.max_length)});
  } else {
    out["cu_seqlens"] = owned_array(batch.cu_seqlens, py::dtype("int32"), {B + 1});
    out["position_ids"] =
        owned_array(batch.position_ids, py::dtype("int64"), {static_cast<py::ssize_t>(batch.total_tokens)});
  }
  return out;
}

std::vector<alignkit::FieldSpec> fields_from_python(const std::vector<py::tuple>& fields, const char* what) {
  std::vector<alignkit::FieldSpec> out;
  for (const py::tuple& t : fields) {
    if (t.size() != 3) throw py::value_error(std::string(what) + ": expected (name, dtype code, pad bytes)");
    alignkit::FieldSpec f;
    f.name = t[0].cast<std::string>();
    f.dtype = alignkit::dtype_from_code(t[1].cast<int32_t>());
    const std::string pad = t[2].cast<std::string>();
    if (pad.size() != static_cast<size_t>(alignkit::dtype_itemsize(f.dtype))) {
      throw py::value_error("pad value of field '" + f.name + "' must have " +
                            std::to_string(alignkit::dtype_itemsize(f.dtype)) + " bytes");
    }
    std::memcpy(f.pad.data(), pad.data(), pad.size());
    out.push_back(std::move(f));
  }
  return out;
}

py::list fields_to_python(const std::vector<alignkit::FieldSpec>& fields) {
  py::list out;
  for (const auto& f : fields) {
    out.append(py::make_tuple(
        f.name, static_cast<int32_t>(f.dtype),
        py::bytes(reinterpret_cast<const char*>(f.pad.data()), static_cast<size_t>(alignkit::dtype_itemsize(f.dtype)))));
  }
  return out;
}

alignkit::GatherSpec gather_spec(const ReplayBuffer& buf, int layout, bool pad_left,
                                 const std::optional<std::vector<std::string>>& pad_values, bool ids_only = false) {
  alignkit::GatherSpec spec;
  spec.ids_only = ids_only;
  if (layout != 0 && layout != 1) throw py::value_error("layout code must be 0 (padded) or 1 (packed)");
  spec.layout = static_cast<alignkit::Layout>(layout);
  spec.pad_left = pad_left;
  if (pad_values) {
    const auto& fields = buf.schema().token_fields;
    if (pad_values->size() != fields.size()) throw py::value_error("expected one pad value per token field");
    for (size_t f = 0; f < fields.size(); ++f) {
      alignkit::PadBytes pad{};
      const std::string& bytes = (*pad_values)[f];
      if (bytes.size() != static_cast<size_t>(alignkit::dtype_itemsize(fields[f].dtype))) {
        throw py::value_error("pad value of field '" + fields[f].name + "' has the wrong size");
      }
      std::memcpy(pad.data(), bytes.data(), bytes.size());
      spec.pad_values.push_back(pad);
    }
  }
  return spec;
}

// A C-contiguous array of the expected dtype (the Python layer converts; this only guards).
alignkit::FieldInput field_input(const py::array& a, DType dtype, const std::string& name) {
  if (!a.dtype().is(numpy_dtype(dtype)) && !a.dtype().equal(numpy_dtype(dtype))) {
    throw py::type_error("field '" + name + "' must have dtype " + alignkit::dtype_name(dtype) + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error("field '" + name + "' must be C-contiguous");
  return {a.data(), static_cast<int64_t>(a.size())};
}

// Runs call(timeout) without the GIL. A positive timeout is waited in slices of <= 0.1 s so
// Ctrl-C (PyErr_CheckSignals) still interrupts a long wait; None waits without limit.
template <typename Call>
Batch call_with_timeout(Call&& call, std::optional<double> timeout) {
  if (timeout && (std::isnan(*timeout) || *timeout < 0.0)) {
    throw py::value_error("timeout must be >= 0 or None, got " + std::to_string(*timeout));
  }
  if (timeout && *timeout == 0.0) {
    py::gil_scoped_release release;
    return call(0.0);
  }
  using clock = std::chrono::steady_clock;
  const double total = timeout ? *timeout : std::numeric_limits<double>::infinity();
  const auto start = clock::now();
  for (;;) {
    const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
    const double slice = std::max(1e-4, std::min(0.1, total - elapsed));
    try {
      py::gil_scoped_release release;
      return call(slice);
    } catch (const alignkit::TimeoutError& e) {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (std::chrono::duration<double>(clock::now() - start).count() >= total) {
        PyErr_SetString(PyExc_TimeoutError,
                        ("timed out after " + std::to_string(total) + " s: " + e.what()).c_str());
        throw py::error_already_set();
      }
    }
  }
}

std::vector<int64_t> id_vector(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
  return std::vector<int64_t>(ids.data(), ids.data() + ids.size());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignkit native core (private; use the alignkit package)";
  m.attr("ABI_VERSION") = ALIGNKIT_EXT_ABI;
  m.attr("__version__") = ALIGNKIT_VERSION;

  m.def(
      "build_info",
      []() {
        const alignkit::BuildInfo info = alignkit::build_info();
        py::dict out;
        out["abi"] = info.abi;
        out["compiler"] = info.compiler;
        out["cplusplus"] = info.cplusplus;
        out["debug"] = info.debug;
        return out;
      },
      "How the native core was compiled: abi, compiler, cplusplus, debug.");

  // ---- replay buffer -------------------------------------------------------------------------
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const alignkit::TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const alignkit::FileError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    } catch (const alignkit::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  m.def(
      "replay_dtype_codes",
      []() {
        py::dict out;
        for (int32_t c = 0; c < alignkit::kNumDTypes; ++c) out[alignkit::dtype_name(alignkit::dtype_from_code(c))] = c;
        return out;
      },
      "NumPy dtype name -> replay buffer dtype code.");

  m.def(
      "first_fit_decreasing",
      [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths, int64_t max_tokens,
         bool padded) {
        std::vector<int64_t> v(lengths.data(), lengths.data() + lengths.size());
        std::vector<std::vector<int64_t>> bins;
        {
          py::gil_scoped_release release;
          bins = alignkit::first_fit_decreasing(v, max_tokens, padded);
        }
        py::list out;
        for (const auto& b : bins) out.append(vector_array(b));
        return out;
      },
      py::arg("lengths"), py::arg("max_tokens"), py::arg("padded"),
      "Token-budget bins (first-fit decreasing): list of int64 index arrays.");

  py::class_<ReplayBuffer>(m, "ReplayBufferCore")
      .def(py::init([](const std::vector<py::tuple>& token_fields, const std::vector<py::tuple>& sequence_fields,
                       int32_t group_field, int32_t version_field, int64_t capacity_tokens,
                       int64_t capacity_sequences, double alpha, uint64_t seed) {
             alignkit::Schema schema;
             schema.token_fields = fields_from_python(token_fields, "token_fields");
             schema.sequence_fields = fields_from_python(sequence_fields, "sequence_fields");
             schema.group_field = group_field;
             schema.version_field = version_field;
             alignkit::BufferConfig config{capacity_tokens, capacity_sequences, alpha, seed};
             return std::make_unique<ReplayBuffer>(std::move(schema), config);
           }),
           py::arg("token_fields"), py::arg("sequence_fields"), py::arg("group_field"), py::arg("version_field"),
           py::arg("capacity_tokens"), py::arg("capacity_sequences"), py::arg("alpha"), py::arg("seed"))
      .def(
          "add",
          [](ReplayBuffer& self, const std::vector<py::array>& token_arrays,
             const std::vector<py::array>& sequence_arrays,
             const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& starts,
             const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths, int64_t row_stride,
             const std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>>& priorities) {
            const auto& schema = self.schema();
            if (token_arrays.size() != schema.token_fields.size() ||
                sequence_arrays.size() != schema.sequence_fields.size()) {
              throw py::value_error("add: wrong number of field arrays");
            }
            if (starts.size() != lengths.size()) throw py::value_error("add: starts and lengths differ in size");
            alignkit::AddRequest req;
            req.num_sequences = static_cast<int64_t>(lengths.size());
            req.row_stride = row_stride;
            req.starts = starts.data();
            req.lengths = lengths.data();
            for (size_t f = 0; f < token_arrays.size(); ++f) {
              req.token_fields.push_back(
                  field_input(token_arrays[f], schema.token_fields[f].dtype, schema.token_fields[f].name));
            }
            for (size_t f = 0; f < sequence_arrays.size(); ++f) {
              req.sequence_fields.push_back(
                  field_input(sequence_arrays[f], schema.sequence_fields[f].dtype, schema.sequence_fields[f].name));
            }
            if (priorities) {
              if (priorities->size() != lengths.size()) {
                throw py::value_error("priorities must have one value per sequence");
              }
              req.priorities = priorities->data();
            }
            std::vector<int64_t> ids;
            {
              py::gil_scoped_release release;  // the arrays above stay referenced (and unresizable)
              ids = self.add(req);
            }
            return vector_array(ids);
          },
          py::arg("token_arrays"), py::arg("sequence_arrays"), py::arg("starts"), py::arg("lengths"),
          py::arg("row_stride"), py::arg("priorities") = py::none())
      .def(
          "sample",
          [](ReplayBuffer& self, int64_t batch_size, bool prioritized, bool replace, double beta,
             std::optional<int64_t> min_version, int64_t min_available, int layout, bool pad_left,
             const std::optional<std::vector<std::string>>& pad_values, std::optional<double> timeout,
             bool ids_only) {
            alignkit::SampleSpec spec;
            spec.batch_size = batch_size;
            spec.strategy = prioritized ? alignkit::Strategy::kPrioritized : alignkit::Strategy::kUniform;
            spec.replace = replace;
            spec.beta = beta;
            spec.filter_version = min_version.has_value();
            spec.min_version = min_version.value_or(0);
            spec.min_available = min_available;
            const alignkit::GatherSpec g = gather_spec(self, layout, pad_left, pad_values, ids_only);
            Batch batch = call_with_timeout([&](double t) { return self.sample(spec, g, t); }, timeout);
            return batch_to_dict(batch, self.schema());
          },
          py::arg("batch_size"), py::arg("prioritized"), py::arg("replace"), py::arg("beta"), py::arg("min_version"),
          py::arg("min_available"), py::arg("layout"), py::arg("pad_left"), py::arg("pad_values"), py::arg("timeout"),
          py::arg("ids_only") = false)
      .def(
          "sample_groups",
          [](ReplayBuffer& self, int64_t num_groups, int64_t min_group_size, std::optional<int64_t> min_version,
             int layout, bool pad_left, const std::optional<std::vector<std::string>>& pad_values,
             std::optional<double> timeout, bool ids_only) {
            alignkit::GroupSpec spec;
            spec.num_groups = num_groups;
            spec.min_group_size = min_group_size;
            spec.filter_version = min_version.has_value();
            spec.min_version = min_version.value_or(0);
            const alignkit::GatherSpec g = gather_spec(self, layout, pad_left, pad_values, ids_only);
            Batch batch = call_with_timeout([&](double t) { return self.sample_groups(spec, g, t); }, timeout);
            return batch_to_dict(batch, self.schema());
          },
          py::arg("num_groups"), py::arg("min_group_size"), py::arg("min_version"), py::arg("layout"),
          py::arg("pad_left"), py::arg("pad_values"), py::arg("timeout"), py::arg("ids_only") = false)
      .def(
          "gather",
          [](ReplayBuffer& self, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
             int layout, bool pad_left, const std::optional<std::vector<std::string>>& pad_values,
             bool skip_missing, bool ids_only) {
            const std::vector<int64_t> v = id_vector(ids);
            const alignkit::GatherSpec g = gather_spec(self, layout, pad_left, pad_values, ids_only);
            Batch batch;
            {
              py::gil_scoped_release release;
              batch = self.gather(v, g, skip_missing);
            }
            return batch_to_dict(batch, self.schema());
          },
          py::arg("ids"), py::arg("layout"), py::arg("pad_left"), py::arg("pad_values"), py::arg("skip_missing"),
          py::arg("ids_only") = false)
      .def(
          "gather_into",
          [](ReplayBuffer& self, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
             int layout, bool pad_left, const std::optional<std::vector<std::string>>& pad_values, int64_t length,
             const std::vector<py::array>& token_outs, const std::vector<py::array>& sequence_outs,
             const std::optional<py::array>& attention_mask, const std::optional<py::array>& cu_seqlens,
             const std::optional<py::array>& position_ids) {
            const auto& schema = self.schema();
            const std::vector<int64_t> v = id_vector(ids);
            const alignkit::GatherSpec g = gather_spec(self, layout, pad_left, pad_values);
            const auto B = static_cast<int64_t>(v.size());
            const bool padded = g.layout == alignkit::Layout::kPadded;
            if (length < 0) throw py::value_error("gather_into: length must be >= 0");
            if (token_outs.size() != schema.token_fields.size() ||
                sequence_outs.size() != schema.sequence_fields.size()) {
              throw py::value_error("gather_into: one output array per field is required");
            }
            // Every destination must be a writable C-contiguous array of exactly the right size.
            auto dest = [](const py::array& a, const py::dtype& dt, int64_t n, const std::string& what) -> void* {
              if (!a.dtype().equal(dt) || !(a.flags() & py::array::c_style) || !a.writeable() ||
                  static_cast<int64_t>(a.size()) != n) {
                throw py::value_error("gather_into: output '" + what + "' must be a writable C-contiguous " +
                                      py::str(dt).cast<std::string>() + " array of " + std::to_string(n) +
                                      " elements");
              }
              return const_cast<void*>(a.data());
            };
            // B * length in int64 without wrapping (a wrapped product could match a small array).
            int64_t padded_size = 0;
            if (__builtin_mul_overflow(B, length, &padded_size)) {
              throw py::value_error("gather_into: " + std::to_string(B) + " rows x length " + std::to_string(length) +
                                    " overflows int64");
            }
            alignkit::OutputPointers out;
            for (size_t f = 0; f < token_outs.size(); ++f) {
              out.token_fields.push_back(dest(token_outs[f], numpy_dtype(schema.token_fields[f].dtype),
                                              padded ? padded_size : length, schema.token_fields[f].name));
            }
            for (size_t f = 0; f < sequence_outs.size(); ++f) {
              out.sequence_fields.push_back(
                  dest(sequence_outs[f], numpy_dtype(schema.sequence_fields[f].dtype), B, schema.sequence_fields[f].name));
            }
            if (padded) {
              if (!attention_mask) throw py::value_error("gather_into: attention_mask output is required");
              out.attention_mask = dest(*attention_mask, py::dtype("bool"), padded_size, "attention_mask");
            } else {
              if (!cu_seqlens || !position_ids) throw py::value_error("gather_into: cu_seqlens/position_ids required");
              out.cu_seqlens = dest(*cu_seqlens, py::dtype("int32"), B + 1, "cu_seqlens");
              out.position_ids = dest(*position_ids, py::dtype("int64"), length, "position_ids");
            }
            py::gil_scoped_release release;  // the output arrays stay referenced by this frame
            self.gather_into(v, g, length, out);
          },
          py::arg("ids"), py::arg("layout"), py::arg("pad_left"), py::arg("pad_values"), py::arg("length"),
          py::arg("token_outs"), py::arg("sequence_outs"), py::arg("attention_mask") = py::none(),
          py::arg("cu_seqlens") = py::none(), py::arg("position_ids") = py::none(),
          "Copy ids into caller-owned arrays (e.g. pinned tensors' NumPy views).")
      .def(
          "update_priorities",
          [](ReplayBuffer& self, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
             const py::array_t<double, py::array::c_style | py::array::forcecast>& priorities, bool ignore_missing) {
            if (ids.size() != priorities.size()) {
              throw py::value_error("ids and priorities differ in size: " + std::to_string(ids.size()) + " vs " +
                                    std::to_string(priorities.size()));
            }
            py::gil_scoped_release release;
            self.update_priorities(ids.data(), priorities.data(), static_cast<int64_t>(ids.size()), ignore_missing);
          },
          py::arg("ids"), py::arg("priorities"), py::arg("ignore_missing"))
      .def(
          "priorities",
          [](ReplayBuffer& self, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
            const std::vector<int64_t> v = id_vector(ids);
            std::vector<double> p;
            {
              py::gil_scoped_release release;
              p = self.priorities(v);
            }
            return vector_array(p);
          },
          py::arg("ids"))
      .def(
          "snapshot",
          [](ReplayBuffer& self, std::optional<int64_t> min_version, bool shuffle) {
            alignkit::Snapshot s;
            {
              py::gil_scoped_release release;
              s = self.snapshot(min_version.has_value(), min_version.value_or(0), shuffle);
            }
            return py::make_tuple(vector_array(s.ids), vector_array(s.lengths));
          },
          py::arg("min_version"), py::arg("shuffle"))
      .def("size", &ReplayBuffer::size, py::call_guard<py::gil_scoped_release>())
      .def("num_tokens", &ReplayBuffer::num_tokens, py::call_guard<py::gil_scoped_release>())
      .def("first_id", &ReplayBuffer::first_id, py::call_guard<py::gil_scoped_release>())
      .def("next_id", &ReplayBuffer::next_id, py::call_guard<py::gil_scoped_release>())
      .def("clear", &ReplayBuffer::clear, py::call_guard<py::gil_scoped_release>())
      .def("save", &ReplayBuffer::save, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def("to_bytes",
           [](ReplayBuffer& self) {
             std::string s;
             {
               py::gil_scoped_release release;
               s = self.to_bytes();
             }
             return py::bytes(s);
           })
      .def_static("load", &ReplayBuffer::load, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_static(
          "from_bytes",
          [](const py::bytes& data) {
            std::string s = data;
            py::gil_scoped_release release;
            return ReplayBuffer::from_bytes(s);
          },
          py::arg("data"))
      .def("schema",
           [](const ReplayBuffer& self) {
             const auto& s = self.schema();
             return py::make_tuple(fields_to_python(s.token_fields), fields_to_python(s.sequence_fields),
                                   s.group_field, s.version_field);
           })
      .def("config", [](const ReplayBuffer& self) {
        const auto& c = self.config();
        py::dict out;
        out["capacity_tokens"] = c.capacity_tokens;
        out["capacity_sequences"] = c.capacity_sequences;
        out["alpha"] = c.alpha;
        out["seed"] = c.seed;
        return out;
      });
}
