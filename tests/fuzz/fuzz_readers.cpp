// The safetensors and GGUF readers under AddressSanitizer: valid files mutated at random (byte flips
// in the header, truncations, lengths set to huge values), each opened and every tensor read.
// A crash, an out-of-bounds read or an exception other than UserError fails the run.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <unistd.h>

#include "core/error.h"
#include "io/gguf.h"
#include "io/safetensors.h"

using namespace moeforge;

static std::string read_all(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 400;
  const std::string dir = "/tmp/moeforge_fuzz_" + std::to_string(::getpid());
  std::system(("mkdir -p " + dir).c_str());
  io::write_safetensors(dir + "/ok.safetensors",
                        {{"a", at::randn({4, 8})}, {"b", at::ones({3}, at::kBFloat16)}, {"c", at::zeros({0, 2})},
                         {"d", at::arange(10, at::kLong)}},
                        {{"format", "pt"}});
  io::GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_u32("llama.block_count", 1);
  g.add_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a", "b"});
  g.add_f32_array("tokenizer.ggml.scores", {0, 0, 0, -1, -2});
  g.add_tensor("token_embd.weight", at::randn({5, 8}), io::GgmlType::F16);
  g.add_tensor("output_norm.weight", at::ones({8}), io::GgmlType::F32);
  g.write(dir + "/ok.gguf");
  std::mt19937_64 rng(7);
  int opened = 0, rejected = 0;
  for (std::string base : {"ok.safetensors", "ok.gguf"}) {
    const std::string good = read_all(dir + "/" + base);
    for (int k = 0; k < rounds; ++k) {
      std::string bad = good;
      switch (rng() % 4) {
        case 0: bad.resize(rng() % good.size()); break;
        case 1: for (int f = 0; f < 1 + static_cast<int>(rng() % 6); ++f) bad[rng() % std::min<size_t>(bad.size(), 512)] = static_cast<char>(rng()); break;
        case 2: { uint64_t v = rng() % 2 ? ~0ull : (rng() % 100000); size_t at = (rng() % std::max<size_t>(1, std::min<size_t>(bad.size(), 256) - 8)); std::memcpy(&bad[at], &v, 8); break; }
        default: bad.insert(rng() % bad.size(), std::string(1 + rng() % 16, static_cast<char>(rng()))); break;
      }
      const std::string path = dir + "/m_" + base;
      std::ofstream(path, std::ios::binary | std::ios::trunc) << bad;
      try {
        if (base == "ok.gguf") {
          auto f = io::GgufFile::open(path);
          for (const auto& t : f.tensors()) (void)f.get(t.name);
        } else {
          auto f = io::SafetensorsFile::open(path);
          for (const auto& n : f.names()) (void)f.get(n);
        }
        ++opened;
      } catch (const UserError&) {
        ++rejected;
      }
    }
  }
  std::system(("rm -rf " + dir).c_str());
  std::printf("fuzz_readers: %d mutated files, %d opened, %d rejected with a UserError, no crash\n", opened + rejected,
              opened, rejected);
  return rejected > 0 ? 0 : 1;
}
