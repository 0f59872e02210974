/* bt_core.h: what C sources include. The declarations themselves live in bt_cdef.h, which cffi
 * reads as data (it cannot parse #include); this header supplies the types they use. */
#ifndef BT_CORE_H
#define BT_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "bt_cdef.h"

#endif /* BT_CORE_H */
