"""Conversations as a token corpus (corpus.kind chat): messages rendered with the teacher
tokenizer's own chat template, the assistant's tokens marked, one conversation per window
(or per run of whole turns when it is longer than seq_len).

    corpus = TokenCorpus.from_chat(".assets/chitchat.jsonl", tokenizer_path=teacher_dir, seq_len=256)
    b = corpus.lm_batch(pos)        # b["mask"] (B, Lb): positions whose target is an assistant token

Input: JSONL, one conversation per line, {"messages": [{"role": ..., "content": ...}, ...]}
(the format of TRL and the Hugging Face chat templates), or a Parquet column of such lists.
Roles are system, user and assistant; an unknown role, a non-text content, an empty
assistant message is refused naming the file and line (Parquet: row). A conversation
without an assistant message has nothing to learn from and is skipped (counted).

Rendering: tokenizer.apply_chat_template(messages, tokenize=False), the template read from
the local tokenizer files (chat_template.jinja or tokenizer_config.json); a tokenizer without
one is refused. The assistant's part of message i is what rendering messages[: i + 1] adds
to rendering messages[: i] with the generation prompt (for ChatML: the content and
<|im_end|>; the "<|im_start|>assistant\n" header is the prompt, never a target), trailing
whitespace dropped. A template that does not render conversations prefix by prefix (the
render of messages[: i] a prefix of messages[: i + 1]) cannot give such spans and is
refused. The rendered text is tokenized once (no special tokens added: the template
writes them) and a token is an assistant token when its first character lies in such a
span; a position is labelled when its TARGET is one (the student learns to write the
assistant's tokens, end-of-turn included, given everything before).

The cache (beside the token stream of plain corpora, same key rules plus the template's
sha256): <key>.mask.npy (uint8 per stream token: 1 = assistant), <key>.turns.npy (int64
stream offset of every message), <key>.lines.npy (int64 source line of every conversation).

Windows (turn_windows): conversations never share a window; a conversation longer than
seq_len positions is cut at message starts into runs of whole messages, as many as fit; a
single message longer than seq_len cannot be cut so and is refused (file, line, message).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.data.jsonl import field_values
from pipeline.paths import save_npy_atomic

ROLES = ("system", "user", "assistant")
BATCH = 256


def template_of(tokenizer, where: str) -> str:
    """The tokenizer's chat template (a string), or ValueError naming where it was loaded from."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # several named templates: the default one
        t = t.get("default")
    if not isinstance(t, str) or not t.strip():
        raise ValueError(
            f"the tokenizer at {where} has no chat template (chat_template.jinja or tokenizer_config.json's "
            f"chat_template): corpus.kind chat renders conversations with it"
        )
    return t


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


def check_messages(messages, where: str) -> list[dict]:
    """[{role, content}] checked (ValueError naming `where`, e.g. "file: line 3")."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with role and content, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} ({m['role']}): content is {type(m['content']).__name__}, not text")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: message {i} is an empty assistant message")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_jsonl(path: str, field: str):
    """(line number, messages) of every non-blank line, checked."""
    for n, messages in field_values(path, field, "corpus.messages_field"):
        yield n, check_messages(messages, f"{path}: line {n}")


def read_parquet(path: str, column: str):
    """(row number from 1, messages) of every row of a Parquet column of message lists."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path}: messages column {column!r} not found, columns are {pf.schema_arrow.names}")
    n = 0
    for batch in pf.iter_batches(batch_size=BATCH, columns=[column]):
        for msgs in batch.column(0).to_pylist():
            n += 1
            yield n, check_messages(msgs, f"{path}: row {n}")


def render(tokenizer, messages: list[dict], where: str) -> tuple[str, list[int], list[tuple[int, int]]]:
    """(text, each message's first character, the assistant spans [a, b) in characters)."""

    def text(msgs, prompt=False):
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = text(messages)
    starts, spans, prev = [], [], ""
    for i, m in enumerate(messages):
        starts.append(len(prev))
        upto = text(messages[: i + 1])
        head = text(messages[:i], prompt=True) if m["role"] == "assistant" else prev
        if not (full.startswith(upto) and upto.startswith(prev) and upto.startswith(head)):
            raise ValueError(
                f"{where}: the tokenizer's chat template does not render this conversation prefix by prefix "
                f"(message {i}), so the assistant's tokens cannot be told apart; use a ChatML-style template"
            )
        if m["role"] == "assistant":
            b = len(upto.rstrip())
            spans.append((len(head), max(b, len(head))))
        prev = upto
    return full, starts, spans


def build_chat_cache(conversations, tokenizer, sep: int, dtype, tokens_path: str, docs_file: str, header: dict) -> dict:
    """Render and tokenize every conversation ((line, messages) pairs); write the token
    stream (each conversation followed by one `sep`), the assistant mask, the message and
    conversation starts and the source lines, each os.replace'd; return the sidecar
    fields (the caller writes the sidecar last, so a killed build leaves no cache).
    docs_file: where the conversations' first offsets go (the corpus' <key>.docs.npy)."""

    path = header["source"]["path"]
    toks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    docs, turns, lines = [], [], []
    n = skipped = messages = 0

    def flush(batch):
        nonlocal n
        enc = tokenizer(
            [t for _, t, _, _ in batch],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for (line, _, starts, spans), ids, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
            first = np.asarray([o[0] for o in offs], dtype=np.int64)  # (T,) first character of each token
            m = np.zeros(len(ids), np.uint8)
            for a, b in spans:
                m[(first >= a) & (first < b)] = 1
            if not m.any():
                raise ValueError(f"{path}: line {line}: the assistant messages render to no token")
            docs.append(n)
            lines.append(line)
            turns.extend((n + np.searchsorted(first, starts)).tolist())  # each message's first token
            # every conversation ends with the separator: its last target, never labelled
            toks.append(np.append(np.asarray(ids, np.int64), sep))
            masks.append(np.append(m, np.uint8(0)))
            n += len(ids) + 1

    batch = []
    for line, msgs in conversations:
        if not any(m["role"] == "assistant" for m in msgs):
            skipped += 1
            continue
        messages += len(msgs)
        batch.append((line, *render(tokenizer, msgs, f"{path}: line {line}")))
        if len(batch) == BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not docs:
        raise ValueError(f"{path}: no conversation with an assistant message ({skipped} skipped)")
    tokens = np.concatenate(toks)
    mask = np.concatenate(masks)
    h = hashlib.sha256(tokens.astype("<u4").tobytes())
    h.update(mask.tobytes())  # the fingerprint covers which tokens are the assistant's
    for p, a in (
        (docs_file, np.asarray(docs, np.int64)),
        (chat_path(tokens_path, "turns"), np.asarray(turns, np.int64)),
        (chat_path(tokens_path, "lines"), np.asarray(lines, np.int64)),
        (chat_path(tokens_path, "mask"), mask),
        (tokens_path, tokens.astype(dtype)),
    ):
        save_npy_atomic(p, a)
    return {
        "num_tokens": int(len(tokens)),
        "documents": len(docs),
        "empty_documents": skipped,
        "rows_in_source": len(docs) + skipped,
        "messages": messages,
        "assistant_tokens": int(mask.sum()),
        "dtype": np.dtype(dtype).name,
        "fingerprint": h.hexdigest(),
    }


def chat_path(tokens_path: str, what: str) -> str:
    """<key>.mask.npy / <key>.turns.npy / <key>.lines.npy beside <key>.tokens.npy."""
    return tokens_path[: -len(".tokens.npy")] + f".{what}.npy"


def turn_windows(
    conv_starts: np.ndarray,
    turn_starts: np.ndarray,
    lines: np.ndarray,
    num_tokens: int,
    L: int,
    path: str,
    unit: str = "line",
    skip_long: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stream start, positions n <= L, conversation index) of every window. Conversation d
    is the tokens [s_d, e_d), e_d its separator (the last target: the stream ends with one); it
    is one window when e_d - s_d <= L, else cut greedily at message starts into runs of
    whole messages of at most L positions. A message longer than L is refused, or with
    skip_long its conversation is left out (no window)."""
    s = np.asarray(conv_starts, np.int64)
    e = np.append(s[1:] - 1, num_tokens - 1)
    cut = np.searchsorted(turn_starts, s)  # each conversation's first message
    cut = np.append(cut, len(turn_starts))
    starts, ns, conv = [], [], []
    for d in range(len(s)):
        if e[d] - s[d] <= L:  # the common case: the whole conversation
            starts.append(s[d]), ns.append(e[d] - s[d]), conv.append(d)
            continue
        bounds = np.append(turn_starts[cut[d] : cut[d + 1]], e[d])  # message starts, then the end
        if skip_long and np.diff(bounds).max() > L:
            continue
        a = 0  # index into bounds of the window's start
        while bounds[a] < e[d]:
            b = int(np.searchsorted(bounds, bounds[a] + L, side="right")) - 1  # the last boundary that fits
            if b <= a:
                raise ValueError(
                    f"{path}: {unit} {int(lines[d])}: message {a} takes {int(bounds[a + 1] - bounds[a])} tokens "
                    f"with its template, more than seq_len {L}, and a conversation is only cut between "
                    f"messages: raise corpus.seq_len, shorten that message or set corpus.too_long: skip"
                )
            starts.append(bounds[a]), ns.append(bounds[b] - bounds[a]), conv.append(d)
            a = b
    return np.asarray(starts, np.int64), np.asarray(ns, np.int64), np.asarray(conv, np.int64)
