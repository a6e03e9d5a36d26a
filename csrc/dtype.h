// Element-type codes of the row kernels (softmax, LayerNorm). 0 and 1 are the same codes as
// fastattn::DType in attention/params.h (attention takes fp16 / bf16 only); 2 adds fp32.
#pragma once

namespace fastattn {

enum RowDType : int { kRowFloat16 = 0, kRowBFloat16 = 1, kRowFloat32 = 2 };

}  // namespace fastattn
