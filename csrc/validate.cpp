// Argument checks shared by every constructor; the messages name the argument and the allowed range.
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "schedule.h"

namespace fastdiff {

void require_finite(const char* name, double v) {
  if (!std::isfinite(v)) {
    std::ostringstream msg;
    msg << name << " must be a finite number, got " << v;
    throw std::invalid_argument(msg.str());
  }
}

void require_positive(const char* name, double v) {
  require_finite(name, v);
  if (!(v > 0)) {
    std::ostringstream msg;
    msg << name << " must be > 0, got " << v;
    throw std::invalid_argument(msg.str());
  }
}

void require_range(const char* name, double v, double lo, double hi, bool lo_open, bool hi_open) {
  require_finite(name, v);
  bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok) {
    std::ostringstream msg;
    msg.precision(17);
    msg << name << " must be in " << (lo_open ? "(" : "[") << lo << ", " << hi << (hi_open ? ")" : "]")
        << ", got " << v;
    throw std::invalid_argument(msg.str());
  }
}

}  // namespace fastdiff
