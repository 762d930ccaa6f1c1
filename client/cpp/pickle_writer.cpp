#include "client/cpp/pickle_writer.h"

#include <string>

namespace attnscope {
namespace {

// Pickle opcodes (protocol 4) for the prototype's layout.
struct Pickler {
  std::FILE* f;
  void Raw(const std::string& s) { std::fwrite(s.data(), 1, s.size(), f); }
  void Byte(char c) { std::fputc(c, f); }
  void Int(int64_t v) {
    Byte('J');  // BININT: 4-byte signed
    int32_t x = static_cast<int32_t>(v);
    std::fwrite(&x, 4, 1, f);
  }
  void Str(const std::string& s) {
    Byte('X');  // BINUNICODE
    uint32_t n = static_cast<uint32_t>(s.size());
    std::fwrite(&n, 4, 1, f);
    Raw(s);
  }
  void Global(const std::string& module, const std::string& name) {
    Raw("c" + module + "\n" + name + "\n");
  }
  void IntTuple(const std::vector<int64_t>& v) {
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('t');
  }
  void IntList(const std::vector<int64_t>& v) {
    Byte(']');
    Byte('(');
    for (int64_t x : v) Int(x);
    Byte('e');
  }
  // The opening of numpy.ndarray float32 of `shape` up to its data (BINBYTES8 and the length).
  void Float32ArrayOpen(const std::vector<int64_t>& shape, uint64_t nbytes) {
    Global("numpy.core.multiarray", "_reconstruct");
    Global("numpy", "ndarray");
    Byte('(');
    Int(0);
    Byte('t');
    Raw(
        std::string("C\x01"
                    "b",
                    3));  // SHORT_BINBYTES b'b'
    Byte('\x87');         // TUPLE3
    Byte('R');            // REDUCE
    Byte('(');
    Int(1);
    IntTuple(shape);
    Global("numpy", "dtype");
    Str("f4");
    Byte('\x89');  // False
    Byte('\x88');  // True
    Byte('\x87');
    Byte('R');
    Byte('(');
    Int(3);
    Str("<");
    Byte('N');
    Byte('N');
    Byte('N');
    Int(-1);
    Int(-1);
    Int(0);
    Byte('t');
    Byte('b');     // BUILD dtype
    Byte('\x89');  // not Fortran order
    Byte('\x8e');  // BINBYTES8
    std::fwrite(&nbytes, 8, 1, f);
  }
  void Float32ArrayClose() {
    Byte('t');
    Byte('b');  // BUILD array
  }
};

}  // namespace

absl::Status WritePrototypePickle(
    std::FILE* out, const std::vector<int64_t>& layers, int64_t heads, int64_t T,
    const std::function<absl::Status(size_t i, std::FILE* out)>& write_tensor) {
  Pickler p{out};
  p.Raw(std::string("\x80\x04", 2));
  p.Byte('}');
  p.Byte('(');
  for (size_t i = 0; i < layers.size(); ++i) {
    p.Int(layers[i]);
    p.Byte('}');
    p.Byte('(');
    p.Str("shape");
    p.IntList({1, heads, T, T});
    p.Str("tensor");
    p.Float32ArrayOpen({1, heads, T, T}, static_cast<uint64_t>(heads * T * T * 4));
    if (absl::Status s = write_tensor(i, out); !s.ok()) return s;
    p.Float32ArrayClose();
    p.Byte('u');
  }
  p.Byte('u');
  p.Byte('.');
  if (std::ferror(out)) return absl::DataLossError("cannot write the pickle (disk full?)");
  return absl::OkStatus();
}

}  // namespace attnscope
