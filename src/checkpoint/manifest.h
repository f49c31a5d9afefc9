// Checkpoint manifests: what a checkpoint directory held when it was written, so that a truncated, corrupt or
// missing file is found before anything loads it.
//   step_N/manifest.json  {"format": "moeforge-manifest-1", "hash": "moeforge-h64x4-v1",
//                          "files": {"model.safetensors": {"bytes": N, "hash": "<16 hex digits>"}, ...}}
// It lists every other regular file of the directory, is written last (into the temp / staging directory,
// before the rename) and is computed by reading the files back, so it describes what is on disk.
//
// The hash, moeforge-h64x4-v1: a 64-bit non-cryptographic checksum (it detects damage, not tampering), built to
// run at memory speed on 90 GB checkpoints: four independent lanes, so the multiplies of one 32-byte stripe
// overlap. All arithmetic mod 2^64, words little-endian:
//   K1 = 0x9E3779B97F4A7C15, K2 = 0xC2B2AE3D27D4EB4F, K3 = 0x165667B19E3779F9, SEED = 0xCBF29CE484222325
//   round(acc, w) = rotl(acc + w * K2, 31) * K1
//   lanes v[i] = SEED + i * K1 (i = 0..3); each 32-byte stripe: v[i] = round(v[i], word i of the stripe);
//   a last partial stripe is zero-padded to 32 bytes (the length below tells "a" from "a\0").
//   h = n * K1 (n = total bytes); for i = 0..3: h = rotl(h ^ round(0, v[i]), 27) * K1 + K3
//   avalanche: h ^= h >> 33; h *= K2; h ^= h >> 29; h *= K3; h ^= h >> 32
// Multiplying each word before it meets the lane means no sparse bit pattern in the data cancels itself out.
//
// A checkpoint without manifest.json was written before manifests existed: it is accepted as it is (legacy).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

namespace moeforge::train {

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kManifestFormat = "moeforge-manifest-1";
constexpr const char* kHashName = "moeforge-h64x4-v1";

// moeforge-h64x4-v1 over a stream of bytes: any split into update() calls gives the same digest.
class Hash64 {
 public:
  Hash64();
  void update(const void* data, size_t n);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint8_t buf_[32];
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

uint64_t hash_bytes(const void* data, size_t n);
std::string hash_hex(uint64_t h);  // 16 lower-case hex digits

struct ManifestEntry {
  uint64_t bytes = 0;
  std::string hash;  // hash_hex
  bool operator==(const ManifestEntry& o) const { return bytes == o.bytes && hash == o.hash; }
};
using Manifest = std::map<std::string, ManifestEntry>;  // plain file name -> entry

// The manifest of `dir` as it is now: every regular file but manifest.json, read in 8 MiB blocks.
Manifest compute_manifest(const std::string& dir);
// Computes and writes dir/manifest.json (checked and fsynced; a failed write is a UserError naming it).
void write_manifest(const std::string& dir);
// dir/manifest.json parsed (UserError naming it when unreadable). Names are checked to be plain file names.
Manifest read_manifest(const std::string& dir);

struct CheckpointCheck {
  bool ok = true;
  bool legacy = false;  // no manifest.json: written before manifests, accepted unchecked
  std::string file;     // the first damaged file (relative), or manifest.json
  std::string problem;  // "missing", "truncated (N of M bytes)", ...
  // "<dir>/<file>: <problem>" (one line).
  std::string message(const std::string& dir) const;
};

// Checks every file the manifest lists: present, of its size (all sizes first: cheap), then of its hash.
// Reports the first problem. Files the manifest does not list are ignored.
CheckpointCheck verify_checkpoint(const std::string& dir);
// The same, but a directory that verified earlier in this process and whose listed files all still have the
// same size, inode, mtime and ctime is not hashed again: a resume verifies in latest_checkpoint and then loads,
// and a 90 GB checkpoint should be read for its hash once.
CheckpointCheck verify_checkpoint_once(const std::string& dir);
// verify_checkpoint_once, or UserError("<dir>/<file>: <problem>; the checkpoint is damaged").
void require_intact_checkpoint(const std::string& dir);

// Several ranks sharing one file system (sharded checkpoints need one): rank 0 verifies, the others call this
// when rank 0 found `dir` intact. It checks the sizes only (cheap: a truncated or missing file is still found)
// and takes the hashes as rank 0 found them; the directory then counts as verified in this process, so the
// job reads a checkpoint for its hash once, not once per rank.
CheckpointCheck accept_checkpoint_verified_by_main(const std::string& dir);
// The ranks of a job as these checks see them (checkpoint/model_setup.h: job_ranks of a layout). Both functions are
// collectives: every rank calls them, in the same order.
struct JobRanks {
  bool main = true;
  std::function<int64_t(int64_t)> from_main;  // rank 0's value on every rank
  std::function<int64_t(int64_t)> sum;        // the sum over the ranks
};
// Every rank stops together. rank0_decides: rank 0's `problem` (empty: none) stops every rank with a UserError,
// rank 0's naming it, the others' saying `others`. any_rank_stops: any rank's problem stops them all, each rank with
// one naming its own, the rest saying `others`. One process (no collectives): its own problem, if any.
void rank0_decides(const JobRanks& job, const std::string& problem, const std::string& others);
void any_rank_stops(const JobRanks& job, const std::string& problem, const std::string& others);
// require_intact_checkpoint for such a job: rank 0 verifies, the others accept; a damaged checkpoint (found by any
// rank) is a UserError on every rank, rank 0's or the finder's naming the file. Without collectives (one
// process): require_intact_checkpoint.
void require_intact_checkpoint_once_per_job(const std::string& dir, const JobRanks& job);

}  // namespace moeforge::train
