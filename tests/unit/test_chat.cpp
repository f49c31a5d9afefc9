#include <gtest/gtest.h>

#include "core/error.h"
#include "corpus.h"
#include "data/chat.h"

using namespace moeforge;
using namespace moeforge::data;

TEST(Chat, MistralTemplateRendersExactly) {
  std::vector<Message> m{{"user", "Hello"}, {"assistant", "Hi"}, {"user", "Bye"}, {"assistant", "Ok"}};
  EXPECT_EQ(render_mistral(m, "t"), "<s>[INST] Hello [/INST]Hi</s>[INST] Bye [/INST]Ok</s>");
  std::vector<Message> s{{"system", "Be brief."}, {"user", "Hello"}, {"assistant", "Hi"}};
  EXPECT_EQ(render_mistral(s, "t"), "<s>[INST] Be brief.\n\nHello [/INST]Hi</s>");
  std::vector<Message> open{{"user", "Hello"}};
  EXPECT_EQ(render_mistral(open, "t"), "<s>[INST] Hello [/INST]");
}

TEST(Chat, NonAlternatingIsAClearError) {
  std::vector<Message> bad{{"user", "a"}, {"user", "b"}};
  try {
    render_mistral(bad, "f.jsonl:3");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("f.jsonl:3"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("expected 'assistant'"), std::string::npos);
  }
  EXPECT_THROW(render_mistral({{"assistant", "x"}}, "t"), UserError);
  EXPECT_THROW(render_mistral({{"system", "x"}}, "t"), UserError);
  EXPECT_THROW(render_mistral({{"user", "a"}, {"tool", "b"}}, "t"), UserError);
}

TEST(Chat, LossMaskCoversExactlyTheAssistantTurnsAndEos) {
  test::TempDir dir("chat");
  test::make_prepared(dir, 40);
  Tokenizer tok(dir / "tok/tokenizer.model");
  std::vector<Message> m{{"user", "Hello"}, {"assistant", "Hi"}, {"user", "Bye"}, {"assistant", "Ok"}};
  auto ex = tokenize_chat(tok, m, false, "t");
  ASSERT_EQ(ex.ids.size(), ex.loss_mask.size());
  EXPECT_EQ(ex.ids[0], tok.bos_id());  // special ids, not the text "<s>"
  EXPECT_EQ(std::count(ex.ids.begin(), ex.ids.end(), tok.bos_id()), 1);
  EXPECT_EQ(std::count(ex.ids.begin(), ex.ids.end(), tok.eos_id()), 2);
  // The masked-in tokens, in order, decode to "Hi</s>" and "Ok</s>".
  std::vector<std::vector<int>> runs;
  for (size_t i = 0; i < ex.ids.size(); ++i) {
    if (!ex.loss_mask[i]) continue;
    if (i == 0 || !ex.loss_mask[i - 1]) runs.emplace_back();
    runs.back().push_back(ex.ids[i]);
  }
  ASSERT_EQ(runs.size(), 2u);
  for (size_t r = 0; r < 2; ++r) {
    EXPECT_EQ(runs[r].back(), tok.eos_id());
    std::vector<int> text(runs[r].begin(), runs[r].end() - 1);
    EXPECT_EQ(tok.decode(text), r == 0 ? "Hi" : "Ok");
  }
  // The unmasked tokens decode to the prompts.
  std::vector<int> prompt;
  for (size_t i = 1; i < ex.ids.size(); ++i)
    if (!ex.loss_mask[i] && ex.ids[i] != tok.bos_id()) prompt.push_back(ex.ids[i]);
  EXPECT_NE(tok.decode(prompt).find("[INST] Hello [/INST]"), std::string::npos);
  auto all = tokenize_chat(tok, m, true, "t");
  EXPECT_EQ(std::count(all.loss_mask.begin(), all.loss_mask.end(), 1), static_cast<long>(all.ids.size()) - 1);
}

TEST(Chat, ThreeJsonlShapes) {
  bool plain = false;
  auto a = example_messages(nlohmann::json::parse(R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})"), "x", &plain);
  EXPECT_EQ(a.size(), 2u);
  EXPECT_FALSE(plain);
  auto b = example_messages(nlohmann::json::parse(R"({"prompt": "2+2=", "completion": "4"})"), "x", &plain);
  EXPECT_EQ(b[1].content, "4");
  auto c = example_messages(nlohmann::json::parse(R"({"text": "plain"})"), "x", &plain);
  EXPECT_TRUE(plain);
  EXPECT_THROW(example_messages(nlohmann::json::parse(R"({"prompt": "x"})"), "f:2", &plain), UserError);
  EXPECT_THROW(example_messages(nlohmann::json::parse(R"({"prompt": "x", "completion": ""})"), "f:2", &plain), UserError);
  EXPECT_THROW(example_messages(nlohmann::json::parse(R"({"messages": [{"role": "user"}]})"), "f:2", &plain), UserError);
  EXPECT_THROW(example_messages(nlohmann::json::parse(R"([1, 2])"), "f:2", &plain), UserError);
}
