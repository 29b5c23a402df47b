// The fused CPU step compiled into fastdiff._ops as well (its own object file: the two extensions build separately).
#include "../fused_step.cpp"
