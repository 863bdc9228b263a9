// placeholder until filled
#include <kvc/kvc.hpp>
