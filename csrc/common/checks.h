#pragma once
// Argument checks that surface in Python as ValueError / TypeError naming the argument.
#include <c10/util/Exception.h>

#define VIDFAST_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define VIDFAST_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
