// XNNPACK backend options set from Python: the runtime's backend-options API (executorch::runtime::set_option) has
// no Python binding in executorch 1.5.1, so the kernel library, which links the same runtime library as the
// pybindings, carries this one call.
//
// With the weight cache on, XNNPACK packs a weight once per process and every delegate that names the same constant
// data reuses it: the .pte methods (draft, verify, draft_verify, forward) share their packed layers instead of each
// holding its own copy (README, "Previous session"). It applies to programs loaded after the call.

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

extern "C" int layerskip_xnnpack_weight_cache(int enabled) {
  executorch::runtime::BackendOptions<1> options;
  options.set_option("weight_cache_enabled", enabled != 0);
  return static_cast<int>(executorch::runtime::set_option("XnnpackBackend", options.view()));
}
