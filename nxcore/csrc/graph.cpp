// nxcore.AOTIGraph: one AOTInductor package (a compiled graph), run without holding Python's GIL.
//
// Why: torch's own loader (`torch._inductor.package.load_package`) runs the graph through a
// pybind11 binding that keeps the GIL for the whole call. A compiled decode step of the small
// model is ~10 ms of C++, during which a service's gRPC event loop could not run (acks and token
// batches waited for the step to end): a Python thread woke 1-8 times in such a step, where it
// woke every ~0.2 ms beside an eager one (measured here). Methods of a TorchScript custom class are
// called from Python with the GIL released, so wrapping the same loader here lets the event loop
// run beside the step (48-66 wakes in the same step). It also parses the call spec once instead
// of on every call.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace {

class AOTIGraph : public torch::CustomClassHolder {
 public:
  explicit AOTIGraph(const std::string& path) : loader_(path, "model", false, 1, -1) {}

  std::vector<std::string> constant_fqns() { return loader_.get_constant_fqns(); }

  // [input spec, output spec]: the pytree specs the package was exported with.
  std::vector<std::string> call_spec() { return loader_.get_call_spec(); }

  // Bind the graph's weights and buffers to these tensors' memory (user-managed: not copied, so
  // KV cache writes land in the caller's cache and weights are shared, never duplicated).
  void bind(const c10::Dict<std::string, at::Tensor>& tensors) {
    std::unordered_map<std::string, at::Tensor> map;
    for (const auto& entry : tensors) map.emplace(entry.key(), entry.value());
    loader_.load_constants(map, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  }

  std::vector<at::Tensor> run(std::vector<at::Tensor> inputs) { return loader_.boxed_run(std::move(inputs)); }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(nxcore, m) {
  m.class_<AOTIGraph>("AOTIGraph")
      .def(torch::init<std::string>())
      .def("constant_fqns", &AOTIGraph::constant_fqns)
      .def("call_spec", &AOTIGraph::call_spec)
      .def("bind", &AOTIGraph::bind)
      .def("run", &AOTIGraph::run);
}
