"""Interactive harmony chat: streamed tokens, analysis shown apart from the final answer."""

from __future__ import annotations

from gptoss import harmony
from gptoss.engine import generate_stream


def printable(text: str) -> str:
    """`text` with control characters escaped (a random or byte-level model can emit BEL, ESC, ...)."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


def chat_loop(model, tokenizer, *, reasoning: str = "medium", max_new_tokens: int = 512, temperature: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, seed: int = 0, system: bool = True, stdin, stdout) -> int:
    history = [harmony.system_message(reasoning_effort=reasoning)] if system else []
    stop = list(tokenizer.stop_tokens_for_assistant_actions)
    stdout.write("gptoss chat: empty line or Ctrl-D to quit\n")
    turn = 0
    while True:
        stdout.write("\n> ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            return 0
        history.append(harmony.message("user", line.rstrip("\n")))
        prompt = harmony.render_conversation_for_completion(history, tokenizer=tokenizer)
        budget = min(max_new_tokens, model.config.max_position_embeddings - len(prompt))
        if budget < 1:
            stdout.write("(context is full; start a new chat)\n")
            return 1
        parser = harmony.StreamParser("assistant", tokenizer=tokenizer)
        channel, produced, shown = None, [], False
        for step in generate_stream(model, [prompt], max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                    top_k=top_k, seed=seed + turn, stop_tokens=stop):
            if step[0] is None:
                break
            produced.append(step[0])
            delta = parser.feed(step[0])
            if delta is None or not delta.text:
                continue
            if delta.channel != channel:
                channel = delta.channel
                stdout.write(f"\n[{channel or 'message'}] " if channel != "final" else "\n")
            stdout.write(printable(delta.text))
            shown = True
            stdout.flush()
        parser.finish()
        if not shown:  # nothing parsed as a message: show what the model produced, and why it is not harmony
            stdout.write(f"\n[raw] {printable(tokenizer.decode(produced))}")
            for problem in parser.problems:
                stdout.write(f"\n(harmony: {printable(str(problem))})")
        # History hygiene is the renderer's job: it drops earlier analysis once a final answer exists.
        history.extend(parser.messages)
        turn += 1
