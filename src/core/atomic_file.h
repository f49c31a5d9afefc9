// Files that are either whole or absent: the one way moeforge writes a file that a crash must not tear.
#pragma once
#include <functional>
#include <string>

namespace moeforge {

// Writes `bytes` to `path` through `path.tmp`: the write checked, the file fsynced, renamed into place,
// the directory fsynced. A failure is a UserError naming the file; what was at `path` is untouched.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Writes `bytes` to `path` in place (created or truncated), every write checked, then fsynced: for files inside a
// directory that is itself renamed into place (a checkpoint). A failed write (ENOSPC, EFBIG, EIO) is a UserError
// "<path>: write failed: <reason>"; the partial file is removed.
void write_file(const std::string& path, const std::string& bytes);

// Copies `from` to `to` the same way (read in blocks, every write checked, fsynced).
void copy_file_checked(const std::string& from, const std::string& to);

// `path` without its trailing slashes ("/" stays "/").
std::string without_trailing_slashes(const std::string& path);

// Writes a directory that is whole or absent: `out_dir` (trailing slashes dropped) must be absent or an empty
// directory, else a UserError "<out_dir>: already exists; choose a new --out directory". `fill` writes the files into
// a temp directory beside it (its path is the argument), which is fsynced and renamed to `out_dir`; if `fill` throws,
// the temp directory is removed and the error passes on. Returns `out_dir` without its trailing slashes.
std::string write_dir_atomic(const std::string& out_dir, const std::function<void(const std::string& tmp)>& fill);

// fsync a file or directory by path (errors ignored: some filesystems refuse it for directories).
void fsync_path(const std::string& path);

}  // namespace moeforge
