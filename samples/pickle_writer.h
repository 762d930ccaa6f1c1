// The prototype's pickle layout (protocol 4): {layer: {'shape': [1, H, T, T], 'tensor': float32
// ndarray}}. Every opcode has a fixed size (ints are 4-byte BININT), so the file is a fixed layout:
//   preamble | per layer: head(layer) | H*T*T float32 | tail | end
// and a writer can assemble the matrices in their final place before writing any opcode.
#pragma once

#include <cstdint>
#include <string>

namespace attnscope {

struct PrototypePickleLayout {
  int64_t layers = 0, heads = 0, T = 0;
  static std::string Preamble();
  // The opcodes before a layer's float32 data (its key, the shape, the ndarray up to BINBYTES8).
  std::string Head(int64_t layer) const;
  static std::string Tail();  // after a layer's data
  static std::string End();
  int64_t data_bytes() const { return heads * T * T * 4; }
  // Offset of layer `slot`'s data in the file, and the file's size.
  int64_t DataOffset(int64_t slot) const;
  int64_t FileSize() const;
  static int64_t HeadSize();  // of Head(layer), the same for every layer
};

}  // namespace attnscope
