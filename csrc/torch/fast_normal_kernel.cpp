// The CPU Philox normals compiled into fastdiff._ops as well (its own object file: the two extensions build separately).
#include "../fast_normal.cpp"
