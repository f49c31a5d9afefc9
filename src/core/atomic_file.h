// Files that are either whole or absent: the one way moeforge writes a file that a crash must not tear.
#pragma once
#include <string>

namespace moeforge {

// Writes `bytes` to `path` through `path.tmp`: the write checked, the file fsynced, renamed into place,
// the directory fsynced. A failure is a UserError naming the file; what was at `path` is untouched.
void write_file_atomic(const std::string& path, const std::string& bytes);

// fsync a file or directory by path (errors ignored: some filesystems refuse it for directories).
void fsync_path(const std::string& path);

}  // namespace moeforge
