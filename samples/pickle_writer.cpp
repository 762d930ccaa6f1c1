#include "samples/pickle_writer.h"

namespace attnscope {
namespace {

// Pickle opcodes (protocol 4) into a string.
struct Pickler {
  std::string out;
  void Raw(const std::string& s) { out += s; }
  void Byte(char c) { out += c; }
  void Int(int64_t v) {
    Byte('J');  // BININT: 4-byte signed, little-endian
    const uint32_t x = static_cast<uint32_t>(static_cast<int32_t>(v));
    for (int i = 0; i < 4; ++i) out += static_cast<char>((x >> (8 * i)) & 0xFF);
  }
  void Str(const std::string& s) {
    Byte('X');  // BINUNICODE
    const uint32_t n = static_cast<uint32_t>(s.size());
    for (int i = 0; i < 4; ++i) out += static_cast<char>((n >> (8 * i)) & 0xFF);
    Raw(s);
  }
  void Global(const std::string& module, const std::string& name) {
    Raw("c" + module + "\n" + name + "\n");
  }
  void IntTuple(std::initializer_list<int64_t> v) {
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('t');
  }
  void IntList(std::initializer_list<int64_t> v) {
    Byte(']');
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('e');
  }
};

}  // namespace

std::string PrototypePickleLayout::Preamble() { return std::string("\x80\x04}(", 4); }

std::string PrototypePickleLayout::Head(int64_t layer) const {
  Pickler p;
  p.Int(layer);
  p.Byte('}');
  p.Byte('(');
  p.Str("shape");
  p.IntList({1, heads, T, T});
  p.Str("tensor");
  // numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') then BUILD with
  // (1, shape, dtype('<f4'), False, bytes).
  p.Global("numpy.core.multiarray", "_reconstruct");
  p.Global("numpy", "ndarray");
  p.Byte('(');
  p.Int(0);
  p.Byte('t');
  p.Raw(
      std::string("C\x01"
                  "b",
                  3));  // SHORT_BINBYTES b'b'
  p.Byte('\x87');       // TUPLE3
  p.Byte('R');          // REDUCE
  p.Byte('(');
  p.Int(1);
  p.IntTuple({1, heads, T, T});
  p.Global("numpy", "dtype");
  p.Str("f4");
  p.Byte('\x89');  // False
  p.Byte('\x88');  // True
  p.Byte('\x87');
  p.Byte('R');
  p.Byte('(');
  p.Int(3);
  p.Str("<");
  p.Byte('N');
  p.Byte('N');
  p.Byte('N');
  p.Int(-1);
  p.Int(-1);
  p.Int(0);
  p.Byte('t');
  p.Byte('b');     // BUILD dtype
  p.Byte('\x89');  // not Fortran order
  p.Byte('\x8e');  // BINBYTES8
  const uint64_t n = static_cast<uint64_t>(data_bytes());
  for (int i = 0; i < 8; ++i) p.out += static_cast<char>((n >> (8 * i)) & 0xFF);
  return p.out;
}

std::string PrototypePickleLayout::Tail() { return "tbu"; }  // end tuple, BUILD array, SETITEMS
std::string PrototypePickleLayout::End() { return "u."; }

int64_t PrototypePickleLayout::HeadSize() {
  // Every int is a 4-byte BININT: the head's size depends on nothing, and is computed once.
  static const int64_t size = static_cast<int64_t>(PrototypePickleLayout{}.Head(0).size());
  return size;
}

int64_t PrototypePickleLayout::DataOffset(int64_t slot) const {
  const int64_t head = HeadSize();
  const int64_t per_layer = head + data_bytes() + static_cast<int64_t>(Tail().size());
  return static_cast<int64_t>(Preamble().size()) + slot * per_layer + head;
}

int64_t PrototypePickleLayout::FileSize() const {
  // Where a next layer's data would start, less its head, plus the end.
  return DataOffset(layers) - HeadSize() + static_cast<int64_t>(End().size());
}

}  // namespace attnscope
