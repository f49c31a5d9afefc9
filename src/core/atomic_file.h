// Files that are either whole or absent: the one way moeforge writes a file that a crash must not tear.
#pragma once
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

// fsync a file or directory by path (errors ignored: some filesystems refuse it for directories).
void fsync_path(const std::string& path);

}  // namespace moeforge
