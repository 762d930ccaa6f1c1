#include "core/safetensors_writer.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/atomic_file.h"

namespace attnscope {

void SafetensorsWriter::Declare(const std::string& name, const std::string& dtype,
                                const std::vector<int64_t>& shape, int64_t nbytes) {
  index_[name] = entries_.size();
  entries_.push_back(SafetensorsEntry{name, dtype, shape, declared_, nbytes});
  declared_ += nbytes;
}

void SafetensorsWriter::AddSource(int64_t nbytes, ByteSource source) {
  sources_.push_back(Source{nbytes, std::move(source)});
  supplied_ += nbytes;
}

void SafetensorsWriter::Add(const std::string& name, const std::string& dtype,
                            const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
  Declare(name, dtype, shape, static_cast<int64_t>(nbytes));
  auto bytes = std::make_shared<std::string>(static_cast<const char*>(data), nbytes);
  AddSource(static_cast<int64_t>(nbytes), [bytes](std::FILE* out) {
    if (!bytes->empty() && std::fwrite(bytes->data(), 1, bytes->size(), out) != bytes->size())
      return absl::DataLossError("short write (disk full?)");
    return absl::OkStatus();
  });
}

absl::Status SafetensorsWriter::Write(const std::string& path, bool replace) const {
  if (declared_ != supplied_) {
    return absl::InternalError(absl::StrCat("safetensors writer: ", declared_,
                                            " bytes declared but ", supplied_, " supplied"));
  }
  if (index_.size() != entries_.size())
    return absl::InternalError("safetensors writer: a tensor name is declared twice");
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  for (const SafetensorsEntry& e : entries_) {
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {e.offset, e.offset + e.bytes}}};
  }
  // Strings from a server or a prompt may hold invalid UTF-8: replaced, never a throw.
  std::string text = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  return WriteFileAtomically(
      path,
      [&](std::FILE* out) -> absl::Status {
        unsigned char le[8];
        const uint64_t len = text.size();
        for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>(len >> (8 * i));
        if (std::fwrite(le, 1, 8, out) != 8 ||
            std::fwrite(text.data(), 1, text.size(), out) != text.size())
          return absl::DataLossError("short write of the header (disk full?)");
        for (const Source& s : sources_) {
          const long before = std::ftell(out);
          if (absl::Status st = s.write(out); !st.ok()) return st;
          if (before >= 0 && std::ftell(out) - before != s.bytes) {
            return absl::InternalError(absl::StrCat("safetensors writer: a source wrote ",
                                                    std::ftell(out) - before, " bytes instead of ",
                                                    s.bytes));
          }
        }
        return absl::OkStatus();
      },
      replace);
}

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::function<absl::Status(std::FILE* out)>& write,
                                 bool replace) {
  absl::Status s;
  auto file = AtomicFile::Create(path);
  if (!file.ok()) {
    s = file.status();
  } else {
    s = write((*file)->stream());
    if (s.ok()) s = (*file)->Publish(replace);
  }
  if (!s.ok() && s.message().find(path) == absl::string_view::npos)
    s = absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  return s;
}

}  // namespace attnscope
