"""Scores and log-probs read from lengths, with pad == eos: invariant to padding and to batch-mates."""
import torch

import common as C

import bookkeeping as bk
from conftest import word_tokenizer

EOS = 0
ENDOFTEXT = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}   # id 0


def tiny(cls_name, **kw):
    import transformers

    C.set_seed(0)
    cfg = transformers.PhiConfig(**{**dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64, pad_token_id=EOS,
                                           eos_token_id=EOS), **kw})
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_score(labels, head="reward"):
    """-> (a ScoreModel on a tiny Phi backbone, transformers' own *ForSequenceClassification / *ForTokenClassification
    holding the same weights)."""
    model = C.ScoreModel(tiny("PhiModel"), labels, head).eval()
    twin = tiny(model.config.architectures[0], num_labels=len(labels))
    twin.load_state_dict(model.state_dict())
    return model, twin


def right_pad(seqs):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), EOS)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def left_pad(seqs):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), EOS)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], mask[i, L - len(s):] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def test_reward_score_ignores_padding_and_batch_mates():
    rm, twin = tiny_score(["help", "safe"])
    seq = [5, 6, 7, 8]                           # a reward model's input: no final EOS (encode_pairs)
    others = [[9, 10, 11, 12, 13, 14, 15, 16], [3], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]
    alone = C.sequence_scores(rm, *right_pad([seq]))
    for pad in (right_pad, left_pad):
        batch = C.sequence_scores(rm, *pad([seq] + others))
        torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-5)
    # the score is transformers' own: its pooling (the last token that is not pad == eos) on the plain text, alone
    # or right-padded with EOS in a batch, as a pipeline or TRL would read the saved model
    assert type(twin).__name__ == "PhiForSequenceClassification"
    torch.testing.assert_close(twin(input_ids=torch.tensor([seq])).logits[0], alone[0], rtol=1e-5, atol=1e-5)
    ids, mask = right_pad([seq] + others)
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits, C.sequence_scores(rm, ids, mask),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_response_logprobs_ignore_left_padding_of_the_prompt():
    lm = tiny("PhiForCausalLM")
    prompts, responses = [[5, 6, 7], [8, 9, 10, 11, 12, 13]], [[20, 21, EOS], [22, EOS, EOS]]
    p_ids, p_mask = left_pad(prompts)
    r_ids = torch.tensor(responses)
    r_mask = C.response_mask(r_ids, EOS)
    seq, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    batched = C.response_logprobs(lm, seq, mask, p_ids.shape[1])
    for i in range(2):
        s = torch.tensor([prompts[i] + responses[i]])
        alone = C.response_logprobs(lm, s, torch.ones_like(s), len(prompts[i]))
        n = int(r_mask[i].sum())
        torch.testing.assert_close(batched[i, :n], alone[0, :n], rtol=1e-5, atol=1e-5)


def test_encode_pairs_and_prompts_cut_the_users_text_never_the_template(capsys):
    class Tok:  # one token per character, eos = 0, no pad token
        eos_token_id, pad_token_id = 0, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    tok = Tok()
    ids, mask, cut = C.encode_pairs(tok, ["a long prompt " * 5 + "END"], ["answer"], max_len=40, template="phi2")
    n = int(mask[0].sum())
    text = tok.decode(ids[0, :n].tolist())
    assert n <= 40 and cut == 0 and text.startswith("Instruct: ") and text.endswith("END\nOutput: answer")
    ids, mask, cut = C.encode_pairs(tok, ["p"], ["x" * 50], max_len=30, template="phi2")
    assert cut == 1 and mask.sum() == 30
    ids, mask = C.encode_prompts(tok, ["short", "a long prompt " * 5 + "END"], 30, "phi2")
    texts = [tok.decode(r[m.bool()].tolist()) for r, m in zip(ids, mask)]
    assert texts[0] == "Instruct: short\nOutput:" and texts[1].startswith("Instruct: ")
    assert texts[1].endswith("END\nOutput:") and len(texts[1]) <= 30
    assert bk.count_cut_prompts(tok, ["short", "a long prompt " * 5], 30, "test prompts", "phi2") == 1
    assert "[data] test prompts: 1 of 2 prompts are longer than 30 tokens" in capsys.readouterr().out


@torch.no_grad()
def test_rollouts_are_scored_without_their_final_eos():
    """An RL answer that ended with EOS is scored as its text alone, as the reward model was trained (encode_pairs)
    and as transformers would score the decoded answer; one cut at the length limit is scored as it stands."""
    lm, (rm, twin) = tiny("PhiForCausalLM"), tiny_score(["help", "safe"])
    critic, critic_twin = tiny_score(["help"], "critic")
    prompts, answers = [[5, 6, 7], [8, 9, 10, 11, 12, 13]], [[20, 21, EOS, EOS], [22, 23, 24, 25]]
    p_ids, p_mask = left_pad(prompts)
    a_ids = torch.tensor(answers)
    mask = C.response_mask(a_ids, EOS)
    r = C.Rollouts(["a", "b"], torch.cat([p_ids, a_ids], 1), torch.cat([p_mask, mask], 1), p_ids.shape[1], mask,
                   torch.tensor([True, False]))
    C.score_rollouts(r, lm, lm, critic, [(rm, 0), (rm, 1)])
    for i, text in enumerate([prompts[0] + [20, 21], prompts[1] + [22, 23, 24, 25]]):
        want = torch.sigmoid(twin(input_ids=torch.tensor([text])).logits[0])      # transformers' own pooling
        torch.testing.assert_close(r.scores[i], want, rtol=1e-5, atol=1e-5)
    # the critic's values are those of transformers' token classifier with its weights, before every answer token
    full = critic_twin(input_ids=r.sequences, attention_mask=r.attention_mask,
                       position_ids=C.position_ids_from_mask(r.attention_mask)).logits
    torch.testing.assert_close(r.values, full[:, r.prompt_len - 1 : -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_answers_end_at_every_end_token_the_model_declares():
    """An instruct model ends its turn with a token of its own, listed in generation_config.eos_token_id beside the
    tokenizer's eos. A tiny LM made to say "yes" or its second end token "stop" (an ordinary word, not a special
    token) at random: every answer ends at its first "stop", counts as ended, and its text holds no "stop"."""
    from types import SimpleNamespace

    tok = word_tokenizer(["hello", "there", "yes", "stop"], ENDOFTEXT)
    yes, stop = tok.convert_tokens_to_ids(["yes", "stop"])
    lm = tiny("PhiForCausalLM", vocab_size=len(tok))
    lm.lm_head.weight.zero_()
    lm.lm_head.bias.fill_(-30.0)
    lm.lm_head.bias[[yes, stop]] = 5.0                           # "yes" or "stop", one chance in two at each token
    args = SimpleNamespace(prompt_template="plain", max_prompt_len=8, max_new_tokens=24, temperature=1.0)
    prompts = ["hello there"] * 16
    lm.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert C.end_token_ids(lm, tok) == sorted([tok.eos_token_id, stop])
    torch.manual_seed(0)
    r = C.generate_rollouts(lm, tok, prompts, args, torch.device("cpu"))
    answers = r.sequences[:, r.prompt_len:]
    assert r.ended.all()                                        # 24 tokens without a "stop": 2^-24
    for row, m in zip(answers, r.mask):
        first = (row == stop).nonzero()[0].item()
        assert m.sum() == first + 1 and (row[:first] == yes).all()   # the answer ends at its first "stop"
    lengths = r.mask.sum(1)
    assert lengths.min() < lengths.max()                       # the ends fall at different places
    assert all(set(a.split()) <= {"yes"} for a in r.answers(tok))
    # the same model with only the tokenizer's eos declared runs to the length limit, "stop" and all
    lm.generation_config.eos_token_id = tok.eos_token_id
    r = C.generate_rollouts(lm, tok, prompts, args, torch.device("cpu"))
    assert not r.ended.any() and (r.mask.sum(1) == 24).all() and any("stop" in a for a in r.answers(tok))


def test_response_logprobs_equal_a_full_log_softmax_and_carry_the_same_gradient():
    """The log-probs from the answer's logits alone (logits_to_keep) and a logsumexp per row, against the obvious
    computation: every position's logits, log_softmax over the vocabulary, then the answer's tokens."""
    lm = tiny("PhiForCausalLM", vocab_size=97)
    prompts, responses = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16]], [[20, 21, EOS], [22, EOS, EOS], [23, 24, 25],
                                                                             [26, 27, EOS]]
    p_ids, p_mask = left_pad(prompts)
    r_ids = torch.tensor(responses)
    seq, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, C.response_mask(r_ids, EOS)], 1)
    P = p_ids.shape[1]

    def obvious():
        logits = lm(input_ids=seq, attention_mask=mask, position_ids=C.position_ids_from_mask(mask)).logits
        return torch.gather(logits[:, P - 1 : -1].float().log_softmax(-1), 2, seq[:, P:, None]).squeeze(-1)

    for rows in (1, 3, 8):                                       # chunks of every size, the last one partial
        fast = C.response_logprobs(lm, seq, mask, P, rows=rows)
        want = obvious()
        torch.testing.assert_close(fast, want, rtol=1e-6, atol=1e-6)
        g_fast = torch.autograd.grad(fast.sum(), lm.lm_head.weight)[0]
        g_want = torch.autograd.grad(want.sum(), lm.lm_head.weight)[0]
        torch.testing.assert_close(g_fast, g_want, rtol=1e-5, atol=1e-6)
