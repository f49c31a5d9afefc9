#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "core/error.h"

namespace moeforge {

namespace fs = std::filesystem;

namespace {

// All `n` bytes (short writes continued, EINTR retried); false with errno set. A disk that is full or a file-size
// limit (EFBIG; SIGXFSZ is ignored by the CLI) shows up here.
bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return false;
    if (w == 0) {  // no progress on a regular file: fail rather than spin
      errno = EIO;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// fsync, then close; false with errno set. EINVAL / ENOTSUP / EROFS from fsync mean the filesystem does not offer
// it (the writes were checked); its other errors (EIO, a delayed ENOSPC on NFS) are failed writes.
bool sync_and_close(int fd) {
  if (::fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EROFS) {
    const int err = errno;
    ::close(fd);
    errno = err;
    return false;
  }
  return ::close(fd) == 0;
}

int open_for_write(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);  // the umask applies
  if (fd < 0) throw UserError(path + ": cannot write (" + std::strerror(errno) + ")");
  return fd;
}

// Closes `fd` (when open), removes the partial file and throws.
[[noreturn]] void write_failed(int fd, const std::string& path, int err) {
  if (fd >= 0) ::close(fd);
  ::unlink(path.c_str());
  throw UserError(path + ": write failed: " + std::strerror(err));
}

}  // namespace

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void write_file(const std::string& path, const std::string& bytes) {
  const int fd = open_for_write(path);
  if (!write_all(fd, bytes.data(), bytes.size())) write_failed(fd, path, errno);
  if (!sync_and_close(fd)) write_failed(-1, path, errno);
}

void copy_file_checked(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) throw UserError(from + ": cannot read (" + std::strerror(errno) + ")");
  int out = -1;
  try {
    out = open_for_write(to);
  } catch (...) {
    ::close(in);
    throw;
  }
  constexpr size_t kBlock = 1u << 20;
  std::unique_ptr<char[]> buf(new char[kBlock]);
  for (;;) {
    const ssize_t n = ::read(in, buf.get(), kBlock);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(in);
      ::close(out);
      ::unlink(to.c_str());
      throw UserError(from + ": cannot read (" + std::strerror(err) + ")");
    }
    if (n == 0) break;
    if (!write_all(out, buf.get(), static_cast<size_t>(n))) {
      const int err = errno;
      ::close(in);
      write_failed(out, to, err);
    }
  }
  ::close(in);
  if (!sync_and_close(out)) write_failed(-1, to, errno);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  write_file(tmp, bytes);  // a failure removes tmp; what was at `path` is untouched
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    ::unlink(tmp.c_str());
    throw UserError(path + ": cannot rename into place (" + ec.message() + ")");
  }
  const auto dir = fs::path(path).parent_path();
  fsync_path(dir.empty() ? "." : dir.string());
}

std::string without_trailing_slashes(const std::string& path) {
  std::string out = path;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

std::string write_dir_atomic(const std::string& out_dir, const std::function<void(const std::string& tmp)>& fill) {
  const std::string out = without_trailing_slashes(out_dir);
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw UserError(out + ": already exists; choose a new --out directory");
  const std::string tmp = out + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    fill(tmp);
    fsync_path(tmp);
    if (fs::exists(out)) fs::remove(out);  // the empty directory
    fs::rename(tmp, out);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
  const fs::path parent = fs::path(out).parent_path();
  fsync_path(parent.empty() ? "." : parent.string());
  return out;
}

}  // namespace moeforge
