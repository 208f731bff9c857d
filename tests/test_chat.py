"""The DeepSeek V3.2 chat encoding (spec §11) as text: the model card's example, chat vs thinking mode,
system prompts, dropped reasoning, DSML tool calls and <result> tool outputs, parsing completions, errors.

Expected strings are written out by hand from the spec and the official encoder's format, not produced
by the code under test."""

import json

import pytest

from dsjax import chat

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}


def test_model_card_example():
    messages = [{"role": "user", "content": "hello"},
                {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning": "thinking..."},
                {"role": "user", "content": "1+1=?"}]
    want = (f"{B}{U}hello{A}</think>Hello! I am DeepSeek.{E}{U}1+1=?{A}<think>")
    assert chat.encode_messages(messages, thinking=True) == want


def test_chat_mode_and_system_prompt():
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert chat.encode_messages(messages) == f"{B}You are terse.{U}hi{A}</think>"
    assert chat.encode_messages(messages, add_bos=False) == f"You are terse.{U}hi{A}</think>"
    # A finished assistant turn in chat mode; its reasoning is never rendered.
    done = messages + [{"role": "assistant", "content": "Hello.", "reasoning": "R"}]
    assert chat.encode_messages(done) == f"{B}You are terse.{U}hi{A}</think>Hello.{E}"


def test_context_continues_a_conversation_without_bos():
    first = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    more = [{"role": "user", "content": "c"}]
    assert chat.encode_messages(more, thinking=True, context=first) == f"{U}c{A}<think>"
    assert chat.encode_messages(first[1:] + more, thinking=True, context=first[:1]) == f"b{E}{U}c{A}<think>"
    assert (chat.encode_messages(first) + chat.encode_messages(more, context=first)
            == chat.encode_messages(first + more))


def test_tool_calling_episode_keeps_its_reasoning():
    messages = [
        {"role": "system", "content": "You are a helpful assistant.", "tools": [TOOL]},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning": "Need the tool.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Rome", "days": 2}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
    ]
    text = chat.encode_messages(messages, thinking=True)
    schema = json.dumps(TOOL["function"], ensure_ascii=False)
    # The official encoder's tools block, line by line (its blank lines included).
    d = "｜DSML｜"
    tools_block = "\n".join([
        "## Tools", "",
        "You have access to a set of tools you can use to answer the user's question.",
        f'You can invoke functions by writing a "<{d}function_calls>" block like the following as part of your '
        "reply to the user:",
        f"<{d}function_calls>", f'<{d}invoke name="$FUNCTION_NAME">',
        f'<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>', "...",
        f"</{d}invoke>", f'<{d}invoke name="$FUNCTION_NAME2">', "...", f"</{d}invoke>", f"</{d}function_calls>", "",
        "String and scalar parameters should be specified as is without any escaping or quotes, while lists and "
        'objects should use JSON format. The "string" attribute should be set to "true" for string type parameters '
        'and "false" for other types (numbers, booleans, arrays, objects).', "",
        "If the thinking_mode is enabled, then after function results you should strongly consider outputting a "
        "thinking block. Here is an example:", "",
        f"<{d}function_calls>", "...", f"</{d}function_calls>", "",
        "<function_results>", "...", "</function_results>", "",
        "<think>...thinking about results</think>", "",
        "Here are the functions available in JSONSchema format:", "<functions>", schema, "</functions>", ""])
    assert text.startswith(f"{B}You are a helpful assistant.\n\n{tools_block}{U}Weather in Paris and Rome?")
    assert tools_block.count("\n\n") == 7  # the blank lines some serving stacks' copies drop
    tail = (f"{U}Weather in Paris and Rome?{A}<think>Need the tool.</think>"
            "\n\n<｜DSML｜function_calls>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            '<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            f"</｜DSML｜function_calls>{E}"
            "\n\n<function_results>\n<result>sunny</result>\n<result>rain</result>\n</function_results>\n\n<think>")
    assert text.endswith(tail)
    # In chat mode the tool results close with </think>, and the episode's reasoning is not rendered.
    chat_text = chat.encode_messages(messages, thinking=False)
    assert chat_text.endswith("</function_results>\n\n</think>") and "Need the tool." not in chat_text
    # A new user message ends the episode: its reasoning is dropped from then on.
    later = messages + [{"role": "assistant", "content": "Sunny, then rain."},
                        {"role": "user", "content": "Thanks"}]
    later_text = chat.encode_messages(later, thinking=True)
    assert "Need the tool." not in later_text
    assert later_text.endswith(f"</think>Sunny, then rain.{E}{U}Thanks{A}<think>")


def test_developer_and_response_format():
    m = [{"role": "developer", "content": "Say hi", "response_format": {"type": "json_object"}}]
    want = (f"{B}{U}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
            f'{{"type": "json_object"}}\n\n# The user\'s message is: Say hi{A}<think>')
    assert chat.encode_messages(m, thinking=True) == want


def test_prefix_assistant_turn_is_left_open():
    m = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,", "prefix": True}]
    assert chat.encode_messages(m) == f"{B}{U}Count{A}</think>1, 2,"


def test_parse_completion():
    text = ("Need data.</think>Let me check."
            "\n\n<｜DSML｜function_calls>\n"
            '<｜DSML｜invoke name="search">\n'
            '<｜DSML｜parameter name="q" string="true">weather "today"</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="limit" string="false">3</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="tags" string="false">["a", {"b": 1}]</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            f"</｜DSML｜function_calls>{E}trailing")
    msg = chat.parse_completion(text, thinking=True)
    assert msg["reasoning"] == "Need data." and msg["content"] == "Let me check."
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "search"
    assert json.loads(call["function"]["arguments"]) == {"q": 'weather "today"', "limit": 3, "tags": ["a", {"b": 1}]}
    assert chat.parse_completion(f"Just text.{E}") == {"role": "assistant", "content": "Just text.",
                                                       "reasoning": "", "tool_calls": []}
    # A completion cut off inside the reasoning.
    assert chat.parse_completion("still thinking", thinking=True)["reasoning"] == "still thinking"


def test_parse_inverts_the_assistant_rendering():
    calls = [{"type": "function", "function": {"name": "f", "arguments": json.dumps({"x": "1", "y": [1, 2]})}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "r", "content": "c",
                                                "tool_calls": calls}]
    prompt = chat.encode_messages(msgs[:1], thinking=True)
    full = chat.encode_messages(msgs, thinking=True)
    assert full.startswith(prompt)
    back = chat.parse_completion(full[len(prompt):], thinking=True)
    assert (back["reasoning"], back["content"]) == ("r", "c")
    assert [json.loads(c["function"]["arguments"]) for c in back["tool_calls"]] == [{"x": "1", "y": [1, 2]}]


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "must follow an assistant message"),
    ([{"role": "user", "content": "x"},
      {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]},
      {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}], "2 tool results for 1 tool calls"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "needs reasoning or tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "reasoning": "r",
                                         "tool_calls": [{"name": "f", "arguments": "{bad"}]}], "not JSON"),
    ([{"role": "developer", "content": ""}], "developer message needs content"),
    ({"role": "user", "content": "x"}, "list of dicts"),
])
def test_bad_messages_raise_clear_errors(messages, needle):
    with pytest.raises(ValueError, match=needle):
        chat.encode_messages(messages, thinking=True)
