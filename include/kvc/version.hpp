// kvc/version.hpp: library version and the versioned inline namespace.
//
// Every public name lives in kvc::KVC_ABI_NAMESPACE (an inline namespace), so two
// translation units that include different kvc versions into one program fail to
// link instead of silently sharing incompatible layouts.
#pragma once

#define KVC_VERSION_MAJOR 0
#define KVC_VERSION_MINOR 1
#define KVC_VERSION_PATCH 0
#define KVC_VERSION_STRING "0.1.0"

#define KVC_ABI_NAMESPACE v0_1

#define KVC_NAMESPACE_BEGIN \
  namespace kvc {           \
  inline namespace KVC_ABI_NAMESPACE {
#define KVC_NAMESPACE_END \
  }                       \
  }
