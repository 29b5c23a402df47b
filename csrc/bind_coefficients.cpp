#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "coefficients.h"

namespace py = pybind11;

namespace fastdiff {

void bind_coefficients(py::module_& m) {
  m.attr("NUM_COEF") = kNumCoef;
  m.attr("NUM_META") = kNumMeta;
  m.def("sampler_names", &sampler_names);
  m.def("prediction_names", &prediction_names);
  m.def(
      "make_program",
      [](const Schedule& sch, const std::vector<double>& grid_t, const std::string& sampler,
         const std::string& prediction, const py::dict& options) {
        SamplerOptions opt;
        for (auto item : options) {
          std::string key = py::str(item.first);
          if (py::isinstance<py::str>(item.second)) opt.str[key] = item.second.cast<std::string>();
          else if (item.second.is_none()) continue;
          else opt.num[key] = item.second.cast<double>();
        }
        Program p = make_program(sch, grid_t, sampler, prediction, opt);
        py::array_t<double> coef({p.stages, kNumCoef});
        std::copy(p.coef.begin(), p.coef.end(), coef.mutable_data());
        py::array_t<int32_t> meta({p.stages, kNumMeta});
        std::copy(p.meta.begin(), p.meta.end(), meta.mutable_data());
        int slots = 0;
        for (int k = 0; k < p.stages; ++k)
          for (int c : {READ0, READ1, READ2, WRITE}) slots = std::max(slots, p.meta[k * kNumMeta + c] + 1);
        py::dict out;
        out["coef"] = coef;
        out["meta"] = meta;
        out["t"] = py::array_t<double>(p.t.size(), p.t.data());
        out["model_time"] = py::array_t<double>(p.model_time.size(), p.model_time.data());
        out["slots"] = slots;
        return out;
      },
      py::arg("schedule"), py::arg("grid_t"), py::arg("sampler"), py::arg("prediction"),
      py::arg("options") = py::dict());
}

}  // namespace fastdiff
