#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "grid.h"
#include "schedule.h"

namespace py = pybind11;

namespace fastdiff {
namespace {
py::array_t<double> to_numpy(const std::vector<double>& v) { return py::array_t<double>(v.size(), v.data()); }

template <double (Schedule::*Fn)(double) const>
py::object vectorized(const Schedule& s, py::array_t<double, py::array::c_style | py::array::forcecast> t) {
  return py::vectorize([&s](double x) { return (s.*Fn)(x); })(t);
}
}  // namespace

void bind_schedule(py::module_& m) {
  py::register_exception<std::invalid_argument>(m, "InvalidArgument", PyExc_ValueError);
  py::class_<Schedule>(m, "Schedule")
      .def_static("vp_discrete", &Schedule::vp_discrete, py::arg("betas"))
      .def_static("vp_linear", &Schedule::vp_linear, py::arg("beta_min"), py::arg("beta_max"), py::arg("t_eps"))
      .def_static("vp_cosine", &Schedule::vp_cosine, py::arg("s"), py::arg("t_eps"), py::arg("t_max"))
      .def_static("vp_tabulated", &Schedule::vp_tabulated, py::arg("t"), py::arg("beta"))
      .def_static("sub_vp", &Schedule::sub_vp, py::arg("beta_min"), py::arg("beta_max"), py::arg("t_eps"))
      .def_static("ve", &Schedule::ve, py::arg("sigma_min"), py::arg("sigma_max"))
      .def_static("edm", &Schedule::edm, py::arg("sigma_min"), py::arg("sigma_max"), py::arg("sigma_data"))
      .def_static("flow", &Schedule::flow, py::arg("t_min"), py::arg("t_max"), py::arg("time_scale"))
      .def_property_readonly("name", &Schedule::name)
      .def_property_readonly("t_min", &Schedule::t_min)
      .def_property_readonly("t_max", &Schedule::t_max)
      .def_property_readonly("has_clean_end", &Schedule::has_clean_end)
      .def_property_readonly("clean_end", &Schedule::clean_end)
      .def_property_readonly("num_train_timesteps", &Schedule::num_train_timesteps)
      .def_property_readonly("alphas_cumprod", [](const Schedule& s) { return to_numpy(s.alphas_cumprod()); })
      .def_property_readonly("betas", [](const Schedule& s) { return to_numpy(s.betas()); })
      .def_property_readonly("sigma_data", &Schedule::sigma_data)
      .def_property_readonly("prior_std", &Schedule::prior_std)
      .def("alpha", &vectorized<&Schedule::alpha>)
      .def("sigma", &vectorized<&Schedule::sigma>)
      .def("log_snr", &vectorized<&Schedule::log_snr>)
      .def("edm_sigma", &vectorized<&Schedule::edm_sigma>)
      .def("drift_coef", &vectorized<&Schedule::drift_coef>)
      .def("g2", &vectorized<&Schedule::g2>)
      .def("model_time", &vectorized<&Schedule::model_time>)
      .def("t_from_log_snr", &vectorized<&Schedule::t_from_log_snr>)
      .def("t_from_edm_sigma", &vectorized<&Schedule::t_from_edm_sigma>)
      .def("grid", [](const Schedule& s, int steps, const std::string& spacing, int steps_offset, double rho) {
        return to_numpy(make_grid(s, steps, spacing, steps_offset, rho));
      }, py::arg("steps"), py::arg("spacing"), py::arg("steps_offset"), py::arg("rho"));

  m.def("make_betas", [](int n, const std::string& sched, double b0, double b1, bool rescale) {
    return to_numpy(make_betas(n, sched, b0, b1, rescale));
  }, py::arg("num_train_timesteps"), py::arg("beta_schedule"), py::arg("beta_start"), py::arg("beta_end"),
     py::arg("rescale_zero_terminal_snr"));
  m.def("cumulative_trapezoid", [](const std::vector<double>& t, const std::vector<double>& f) {
    return to_numpy(cumulative_trapezoid(t, f));
  }, py::arg("t"), py::arg("f"));
  m.def("trapezoid_error_bound", &trapezoid_error_bound, py::arg("t"), py::arg("max_abs_f2"));
}

}  // namespace fastdiff
