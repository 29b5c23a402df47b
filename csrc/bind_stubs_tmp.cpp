#include "bindings.h"
namespace fastdiff {
}
