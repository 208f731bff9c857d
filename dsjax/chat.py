"""The DeepSeek V3.2 chat encoding (spec §11): messages -> prompt text, and completion text -> message.

V3.2 ships no Jinja template but an encoder (`encoding/encoding_dsv32.py` in the model repo); this module
renders the same text:

    <｜begin▁of▁sentence｜>{system}{tools}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜><think>                  (thinking mode, the turn to generate)

* A user turn is `<｜User｜>{content}<｜Assistant｜>` followed by `<think>` when it is the last user turn
  and thinking mode is on, else by `</think>`.
* An assistant turn is `{reasoning}{content}{tool calls}<｜end▁of▁sentence｜>`. Reasoning (`{reasoning}
  </think>`) is rendered only after the last user turn, i.e. in the current tool-calling episode;
  reasoning of earlier turns is dropped, as the official encoder does.
* Tool calls are DSML text (full-width bars, not special tokens):
      \\n\\n<｜DSML｜function_calls>
      <｜DSML｜invoke name="NAME">
      <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜function_calls>
  string="true": the value is raw text; "false": it is JSON.
* Tool results follow the assistant turn that called them, in order:
      \\n\\n<function_results>\\n<result>{output}</result>...\\n</function_results>\\n\\n<think> | </think>
* Tools are described in the system (or developer) turn with the official tool-use instructions.

Messages are dicts {"role": "system"|"developer"|"user"|"assistant"|"tool", "content", ...}; assistant
turns may carry "reasoning" (or "reasoning_content") and OpenAI-style "tool_calls"; system/developer turns
may carry OpenAI-style "tools" and a "response_format" schema.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"  # U+FF5C full-width bars: plain text, not a special token
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)

# The tool-use instructions of the official V3.2 encoder (verbatim, blank lines included: the model was trained on
# this text; some serving stacks' copies drop the 7 blank lines).
TOOLS_TEMPLATE = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think_start}...thinking about results{think_end}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool-use block of a system turn; tools are OpenAI-style ({"type": "function", "function": {...}})
    or bare function schemas."""
    schemas = "\n".join(_json(t.get("function", t)) for t in tools)
    return TOOLS_TEMPLATE.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def _tool_call(call: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs a function name, got {call!r}.")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tool call {name!r} has arguments that are not JSON ({e}).") from None
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}: tool call {name!r} arguments must be a JSON object, got {args!r}.")
    return name, dict(args)


def render_tool_calls(calls: Sequence[Mapping[str, Any]], where: str = "assistant message") -> str:
    """The DSML block of an assistant turn (with its leading blank line)."""
    invokes = []
    for call in calls:
        name, args = _tool_call(call, where)
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in args.items())
        invokes.append(f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>')
    return f"\n\n<{DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML}function_calls>"


def _last_user(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _system_extras(msg: Mapping[str, Any]) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT.format(schema=_json(msg["response_format"]))
    return out


def _render(i: int, messages: Sequence[Mapping[str, Any]], thinking: bool, last_user: int) -> str:
    msg = messages[i]
    role, content = msg.get("role"), msg.get("content")
    where = f"message {i} ({role})"
    if role == "system":
        return (content or "") + _system_extras(msg)
    if role in ("user", "developer"):
        if role == "developer":
            if not content:
                raise ValueError(f"{where}: a developer message needs content.")
            content = _system_extras(msg) + f"\n\n# The user's message is: {content}"
        elif content is None:
            raise ValueError(f"{where}: a user message needs content.")
        opens = thinking and i == last_user
        return f"{USER}{content}{ASSISTANT}" + (THINK_START if opens else THINK_END)
    if role == "tool":
        j = i - 1
        while j >= 0 and messages[j].get("role") == "tool":
            j -= 1
        calls = messages[j].get("tool_calls") if j >= 0 and messages[j].get("role") == "assistant" else None
        order = i - j  # 1 for the first result after the assistant turn
        if not calls:
            raise ValueError(f"{where}: a tool result must follow an assistant message with tool_calls.")
        if order > len(calls):
            raise ValueError(f"{where}: {order} tool results for {len(calls)} tool calls of message {j}.")
        out = "\n\n<function_results>" if order == 1 else ""
        out += f"\n<result>{content}</result>"
        if order == len(calls):
            out += "\n</function_results>\n\n" + (THINK_START if thinking and i >= last_user else THINK_END)
        return out
    if role == "assistant":
        calls = msg.get("tool_calls")
        tool_text = render_tool_calls(calls, where) if calls else ""
        reasoning = msg.get("reasoning", msg.get("reasoning_content"))
        think = ""
        if thinking and i > last_user:  # the current tool-calling episode keeps its reasoning
            if not (reasoning or calls):
                raise ValueError(f"{where}: in thinking mode an assistant turn after the last user message "
                                 "needs reasoning or tool_calls.")
            think = (reasoning or "") + THINK_END
        if msg.get("prefix") and not calls:  # a partial answer for the model to continue: no EOS
            return content or ""
        return think + (content or "") + tool_text + EOS
    raise ValueError(f"{where}: unknown role {role!r}; expected system, developer, user, assistant or tool.")


def encode_messages(messages: Sequence[Mapping[str, Any]], *, thinking: bool = False,
                    context: Sequence[Mapping[str, Any]] = (), add_bos: bool = True) -> str:
    """Prompt text of a conversation in the V3.2 format.

    Args:
      messages: the turns to render (dicts with "role", "content", ...; see the module docstring).
      thinking: thinking mode (the generation prompt ends with `<think>`) or chat mode (`</think>`).
      context: earlier turns already in the KV cache: not rendered, but they decide which user turn is the
        last one; BOS is then omitted.
      add_bos: start with `<｜begin▁of▁sentence｜>` (when there is no context).
    Returns:
      the prompt text; tokenize it with `Tokenizer.encode` (special-token strings map to their ids).
    """
    if isinstance(messages, Mapping) or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}.")
    full = list(context) + list(messages)
    last_user = _last_user(full)
    text = BOS if add_bos and not context else ""
    return text + "".join(_render(i, full, thinking, last_user) for i in range(len(context), len(full)))


_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">\n(.*?)\n?</{DSML}invoke>', re.DOTALL)
_PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


def parse_completion(text: str, *, thinking: bool = False) -> dict[str, Any]:
    """The assistant message of a generated completion (decoded with special tokens kept).

    Returns {"role": "assistant", "content", "reasoning", "tool_calls": [{"type": "function", "function":
    {"name", "arguments" (JSON text)}}]}; text after EOS is ignored. A completion cut off before EOS parses
    as far as it goes.
    """
    text = text.split(EOS, 1)[0]
    reasoning = ""
    if thinking:
        if THINK_END not in text:
            return {"role": "assistant", "content": "", "reasoning": text, "tool_calls": []}
        reasoning, text = text.split(THINK_END, 1)
    start = f"\n\n<{DSML}function_calls>"
    content, _, calls_text = text.partition(start)
    calls = []
    for name, body in _INVOKE.findall(calls_text):
        args = {}
        for key, is_str, value in _PARAM.findall(body):
            if is_str == "true":
                args[key] = value
            else:
                try:
                    args[key] = json.loads(value)
                except json.JSONDecodeError:
                    args[key] = value  # malformed JSON from the model: keep the raw text
        calls.append({"type": "function", "function": {"name": name, "arguments": _json(args)}})
    return {"role": "assistant", "content": content, "reasoning": reasoning, "tool_calls": calls}
