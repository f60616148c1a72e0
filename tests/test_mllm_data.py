"""MLLM training data: the conversation format, converters, assistant-only labels, length-grouped batching."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cloc_encoder.data.format import RecordError, read_region_text
from mllm import CLOCLlavaForConditionalGeneration, CLOCLlavaProcessor, get_box_codec
from mllm.chat_template import CHAT_TEMPLATES, INSTRUCTION_FIRST_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE
from mllm.prompts import LMMS_EVAL_REC_PREAMBLE, WORDINGS
from mllm.tiny import tiny_config
from train.config import ConfigError
from train.mllm.build import _with_template as with_template
from train.mllm.config import MLLMTrainConfig
from train.mllm.conversations import (
    conversation_read_report,
    conversations_from_record,
    main,
    parse_conversation,
    parse_wordings,
    read_conversations,
)
from train.mllm.data import (
    IGNORE_INDEX,
    CollateConfig,
    ConversationDataset,
    LabelMaskingError,
    SampleTooLong,
    collate_conversations,
    encode_conversation,
)
from train.samplers import LengthGroupedBatchSampler

SAMPLE = {
    "id": "s1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is [100, 200, 300, 400] <region>?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Where is the blue square?"},
        {"from": "gpt", "value": "[10, 20, 300, 400]"},
    ],
    "boxes": [[0.1, 0.2, 0.3, 0.4]],
}


@pytest.fixture()
def processor(chat_tokenizer):
    return CLOCLlavaProcessor.from_model_config(tiny_config(chat_tokenizer), copy.deepcopy(chat_tokenizer))


def _with_template(processor, template: str):
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = template
    return CLOCLlavaProcessor(processor.image_processor, tokenizer, image_seq_length=processor.image_seq_length)


def _supervised(processor, encoded) -> str:
    ids = [t for t, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist(), strict=True) if label >= 0]
    return processor.tokenizer.decode(ids)


# ----- the format ----------------------------------------------------------------------------------------------------


def test_parse_conversation_and_messages():
    record = parse_conversation(SAMPLE)
    assert record.num_regions == 1 and record.boxes == [[0.1, 0.2, 0.3, 0.4]]
    messages = record.messages()
    assert messages[0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is [100, 200, 300, 400] <region>?"}],
    }
    assert messages[1] == {"role": "assistant", "content": "A red circle."} and len(messages) == 4
    # LLaVA puts <image> anywhere in the turn; a sample with an image and no <image> gets it in its first turn.
    trailing = parse_conversation(
        {
            **SAMPLE,
            "conversations": [{"from": "human", "value": "Hi?\n<image>"}, {"from": "gpt", "value": "Hello."}],
            "boxes": None,
        }
    )
    assert trailing.messages()[0]["content"][1]["text"] == "Hi?"
    implicit = parse_conversation({"id": 3, "image": "a.png", "conversations": SAMPLE["conversations"][2:]})
    assert implicit.messages()[0]["content"][0] == {"type": "image"} and implicit.id == "3"
    text_only = parse_conversation(
        {"id": "t", "conversations": [{"from": "system", "value": "Be brief."}, *SAMPLE["conversations"][2:]]}
    )
    assert text_only.messages()[0] == {"role": "system", "content": "Be brief."} and text_only.image_path is None
    assert parse_conversation(record.to_json()) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"boxes": [[0.1, 0.2, 0.3, 0.4]] * 2}, "2 boxes for 1 <region>"),
        ({"boxes": [[0.5, 0.2, 0.3, 0.4]]}, "boxes"),
        (
            {
                "boxes": None,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is <region>?"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            "not preceded by a box",
        ),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "must start with a human turn"),
        ({"conversations": [{"from": "human", "value": "<image> hi"}]}, "no gpt turn"),
        (
            {"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "<region>"}]},
            "may only appear in human turns",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
            "one image",
        ),
        ({"image": None}, "has no .image."),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "from='robot'"),
    ],
)
def test_malformed_conversations_name_the_problem(change, message):
    with pytest.raises(RecordError, match=message):
        parse_conversation({**SAMPLE, **change}, where="data.json[0]")


def test_read_json_and_jsonl_with_skip_report(tmp_path):
    (tmp_path / "images").mkdir()
    bad = {**SAMPLE, "id": "bad", "boxes": []}
    (tmp_path / "data.json").write_text(json.dumps([SAMPLE, bad]))
    (tmp_path / "more.jsonl").write_text(json.dumps({**SAMPLE, "id": "s2"}) + "\n{oops\n")
    report = conversation_read_report()
    records = read_conversations(tmp_path, report=report)
    assert [r.id for r in records] == ["s1", "s2"] and report.records == 2 and len(report.skipped) == 2
    assert "id bad" in report.skipped[0] and "invalid JSON" in report.skipped[1]
    assert records[0].image_path == tmp_path / "a.png"
    assert read_conversations(tmp_path / "data.json", image_folder=tmp_path / "images")[0].image_path == (
        tmp_path / "images" / "a.png"
    )
    with pytest.raises(RecordError, match="id bad"):
        read_conversations(tmp_path / "data.json", strict=True)


# ----- converters ----------------------------------------------------------------------------------------------------


def test_converters_from_region_text(world, tmp_path):
    records = read_region_text(world / "train.jsonl")
    record = next(r for r in records if len(r.regions) >= 2 and all(region.expressions for region in r.regions))
    codec = get_box_codec("int999")
    samples = conversations_from_record(record, tasks=["grounding", "referring", "caption"], seed=3)
    by_task = {task: [s for s in samples if s["task"] == task] for task in ("grounding", "referring", "caption")}
    assert len(by_task["grounding"]) == len(record.regions) == len(by_task["referring"])
    grounding = by_task["grounding"][0]["conversations"]
    assert grounding[0]["value"].startswith("<image>\nWhere is the ") and grounding[0]["value"].endswith("?")
    assert grounding[1]["value"] == codec.encode(record.regions[0].box)
    assert codec.parse_first_box(grounding[1]["value"]) == pytest.approx(record.regions[0].box, abs=1e-3)
    referring = by_task["referring"][1]
    assert referring["conversations"][0]["value"] == (
        f"<image>\nWhat is {codec.encode(record.regions[1].box)} <region>?"
    )
    assert referring["conversations"][1]["value"] == record.regions[1].caption
    assert referring["boxes"] == [pytest.approx(record.regions[1].box)]
    assert by_task["caption"][0]["conversations"][1]["value"] == record.caption
    assert all(parse_conversation(s) for s in samples)  # every converted sample is valid
    # Several turns per conversation; every expression; deterministic choice.
    multi = conversations_from_record(record, tasks=["grounding", "referring"], max_turns=0, expression="all")
    assert len(multi) == 2 and len(multi[1]["boxes"]) == len(record.regions)
    assert len(multi[0]["conversations"]) == 2 * sum(len(r.expressions) for r in record.regions)
    assert multi[1]["conversations"][2]["value"].startswith("What is [")  # only the first turn holds <image>
    assert samples == conversations_from_record(record, tasks=["grounding", "referring", "caption"], seed=3)
    float_codec = conversations_from_record(record, tasks=["grounding"], codec="float")
    assert float_codec[0]["conversations"][1]["value"] == get_box_codec("float").encode(record.regions[0].box)


def test_conversations_mix_wordings_with_their_codecs(world):
    records = read_region_text(world / "train.jsonl")[:40]
    samples = [
        s
        for record in records
        for s in conversations_from_record(record, tasks=["grounding", "referring"], wordings=list(WORDINGS), seed=1)
    ]
    questions = {}
    for sample in samples:
        question, answer = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        heads = {
            name: (wording.grounding if sample["task"] == "grounding" else wording.referring).split("{")[0]
            for name, wording in WORDINGS.items()
        }
        matching = [name for name, head in heads.items() if question.removeprefix("<image>\n").startswith(head)]
        name = questions[id(sample)] = max(matching, key=lambda n: len(heads[n]))  # the longest head; ties: first
        codec = get_box_codec(WORDINGS[name].box_codec or "int999")
        box_text = answer if sample["task"] == "grounding" else question.split("[", 1)[1]
        fractional = "." in box_text.split("]")[0]
        assert fractional == (codec.name == "float"), (name, question, answer)  # floats where the prompt asks
    # every wording is drawn, for both tasks (lmms-eval's referring question is LLaVA-1.5's)
    drawn = {(s["task"], questions[id(s)]) for s in samples}
    assert drawn == {("grounding", w) for w in WORDINGS} | {("referring", w) for w in ("default", "ferret", "llava")}
    lmms = next(s for s in samples if questions[id(s)] == "lmms_eval" and s["task"] == "grounding")
    assert lmms["conversations"][0]["value"].removeprefix("<image>\n").startswith(LMMS_EVAL_REC_PREAMBLE)
    # the default wording alone gives the conversations of before (the wording draw uses its own random stream)
    default = conversations_from_record(records[0], tasks=["grounding", "referring"], seed=1)
    assert default == conversations_from_record(
        records[0], tasks=["grounding", "referring"], wordings=["default"], seed=1
    )
    with pytest.raises(ValueError, match="unknown or no wording"):
        conversations_from_record(records[0], wordings=["shikra"])


def test_mixed_task_conversations_and_per_task_wordings(world):
    records = [r for r in read_region_text(world / "train.jsonl") if len(r.regions) >= 2][:30]
    options = dict(tasks=["grounding", "referring"], max_turns=2, seed=4)
    wordings = {"grounding": ["default", "lmms_eval"], "referring": ["default"]}

    def convert(**more):
        return [s for r in records for s in conversations_from_record(r, wordings=wordings, **options, **more)]

    mixed, separate = convert(mix_tasks=True), convert()

    # the same questions, cut into conversations differently
    def questions(samples):
        return sorted(t["value"].removeprefix("<image>\n") for s in samples for t in s["conversations"][::2])

    assert questions(mixed) == questions(separate)
    assert {s["task"] for s in separate} == {"grounding", "referring"}
    assert "grounding+referring" in {s["task"] for s in mixed}  # some conversation asks both
    for sample in mixed:
        record = parse_conversation(sample)  # valid: <image> in the first turn, one box per <region>
        asks = {"referring" if "<region>" in text else "grounding" for role, text in record.turns if role == "user"}
        assert sample["task"] == "+".join(t for t in ("grounding", "referring") if t in asks)
    # referring is asked in our words only; grounding in both, lmms-eval's with float boxes
    referring = [t["value"] for s in mixed for t in s["conversations"][::2] if "<region>" in t["value"]]
    assert referring and all(q.removeprefix("<image>\n").startswith("What is [") for q in referring)
    lmms = [
        (q["value"], a["value"])
        for s in mixed
        for q, a in zip(s["conversations"][::2], s["conversations"][1::2], strict=True)
        if LMMS_EVAL_REC_PREAMBLE in q["value"]
    ]
    assert lmms and all("." in answer for _, answer in lmms)
    assert mixed == convert(mix_tasks=True)  # deterministic
    # no conversation asks twice about one region (no answer copied from an earlier turn): every turn's region,
    # found from its box (a referring question's, a grounding answer's) in either codec
    by_id = {r.id: r for r in records}
    codecs = [get_box_codec("int999"), get_box_codec("float")]
    for sample in mixed:
        record = by_id[sample["id"].split("-mixed-")[0]]
        encoded = {codec.encode(region.box): i for i, region in enumerate(record.regions) for codec in codecs}
        asked = []
        for question, answer in zip(sample["conversations"][::2], sample["conversations"][1::2], strict=True):
            text = answer["value"] if "<region>" not in question["value"] else question["value"].split(" <region>")[0]
            asked.append(next(i for box, i in encoded.items() if text.endswith(box)))
        assert len(asked) == len(set(asked)) <= 2, sample
    # a one-object scene: its grounding and referring questions in two conversations
    one = dataclasses.replace(records[0], regions=records[0].regions[:1])
    alone = conversations_from_record(one, wordings=wordings, mix_tasks=True, **options)
    assert sorted(s["task"] for s in alone) == ["grounding", "referring"]
    assert all(len(s["conversations"]) == 2 for s in alone)
    with pytest.raises(ValueError, match="unknown task"):
        conversations_from_record(records[0], wordings={"detection": ["default"]})
    with pytest.raises(ValueError, match="for referring"):
        conversations_from_record(records[0], tasks=["referring"], wordings={"referring": ["shikra"]})
    assert parse_wordings(["default,ferret"]) == ["default", "ferret"]
    assert parse_wordings(["grounding=default,lmms_eval", "referring=default"]) == wordings
    with pytest.raises(ValueError, match="either one list"):
        parse_wordings(["default", "grounding=ferret"])


def test_converter_cli_round_trip(world, tmp_path):
    out = tmp_path / "conv" / "train.json"
    assert main(["--data", str(world / "train.jsonl"), "--out", str(out), "--tasks", "grounding,referring"]) == 0
    records = read_conversations(out)
    assert records and all(r.image_path.is_file() for r in records)  # relative to the output file's folder
    assert {r.extra["task"] for r in records} == {"grounding", "referring"}
    assert main(["--data", str(world / "train.jsonl"), "--out", str(tmp_path / "x.json"), "--tasks", "nope"]) == 2
    mixed = tmp_path / "mixed.json"
    args = ["--data", str(world / "train.jsonl"), "--tasks", "grounding,referring", "--max-turns", "2", "--mix-tasks"]
    assert main([*args, "--out", str(mixed), "--wordings", "grounding=default,lmms_eval"]) == 0
    assert "grounding+referring" in {r.extra["task"] for r in read_conversations(mixed)}
    assert main([*args, "--out", str(mixed), "--wordings", "default", "--wordings", "grounding=ferret"]) == 2
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.json")]) == 2


# ----- label masking -------------------------------------------------------------------------------------------------


def test_only_assistant_tokens_carry_the_loss(processor):
    record = parse_conversation(SAMPLE)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    encoded = encode_conversation(processor, record.messages(), image, record.boxes, sample_id="s1")
    assert _supervised(processor, encoded) == " A red circle.</s> [10, 20, 300, 400]</s>"
    ids, labels = encoded.input_ids, encoded.labels
    assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
    assert int((ids == processor.image_token_id).sum()) == processor.image_seq_length
    assert (labels[ids == processor.region_token_id] == IGNORE_INDEX).all()
    # Exactly what the processor gives at inference, and the inference prompt is the unsupervised prefix.
    reference = processor(images=[image], text=[encoded.text], boxes=[record.boxes])
    assert torch.equal(reference["input_ids"][0], ids)
    torch.testing.assert_close(reference["region_boxes"], encoded.region_boxes)
    prompt = processor.apply_chat_template(record.messages()[:1], add_generation_prompt=True)
    prompt_ids = processor(images=[image], text=[prompt])["input_ids"][0]
    assert torch.equal(ids[: len(prompt_ids)], prompt_ids)
    assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all() and labels[len(prompt_ids)] != IGNORE_INDEX
    by_prefix = encode_conversation(processor, record.messages(), image, record.boxes, assistant_mask="prefix")
    assert torch.equal(by_prefix.labels, labels)


def test_instruction_first_template_puts_the_image_after_the_question(processor):
    instruction_first = _with_template(processor, CHAT_TEMPLATES["instruction_first"])
    record = parse_conversation(SAMPLE)
    text = instruction_first.apply_chat_template(record.messages(), tokenize=False)
    assert text == (
        "USER: What is [100, 200, 300, 400] <region>?\n<image> ASSISTANT: A red circle.</s>"
        "USER: Where is the blue square? ASSISTANT: [10, 20, 300, 400]</s>"
    )
    system = [{"role": "system", "content": "Be brief."}, *record.messages()[:2]]
    assert instruction_first.apply_chat_template(system, tokenize=False).startswith("Be brief. USER: What is")
    # Same supervision as Vicuna v1; the <image> tokens come after the question's.
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    encoded = encode_conversation(instruction_first, record.messages(), image, record.boxes, sample_id="s1")
    assert _supervised(instruction_first, encoded) == " A red circle.</s> [10, 20, 300, 400]</s>"
    ids = encoded.input_ids.tolist()
    first_image = ids.index(processor.image_token_id)
    assert ids.index(processor.region_token_id) < first_image
    assert ids[first_image : first_image + processor.image_seq_length] == [processor.image_token_id] * (
        processor.image_seq_length
    )
    prompt = instruction_first.apply_chat_template(record.messages()[:1], add_generation_prompt=True)
    prompt_ids = instruction_first(images=[image], text=[prompt], boxes=[record.boxes])["input_ids"][0]
    assert torch.equal(encoded.input_ids[: len(prompt_ids)], prompt_ids)


def test_training_config_picks_a_named_template_or_a_file(processor, tmp_path):
    tokenizer = copy.deepcopy(processor.tokenizer)
    for name in ("instruction_first", "vicuna_v1"):
        config = MLLMTrainConfig(train_data="x.json", chat_template=name)
        assert with_template(tokenizer, config).chat_template == CHAT_TEMPLATES[name]
    assert CHAT_TEMPLATES["instruction_first"] == INSTRUCTION_FIRST_CHAT_TEMPLATE != VICUNA_V1_CHAT_TEMPLATE
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    config = MLLMTrainConfig(train_data="x.json", chat_template=str(jinja))
    assert with_template(tokenizer, config).chat_template == jinja.read_text(encoding="utf-8")
    config = MLLMTrainConfig(train_data="x.json", chat_template="instruction_last")
    with pytest.raises(ConfigError, match=r"'instruction_last': not one of \['instruction_first', 'vicuna_v1'\]"):
        with_template(tokenizer, config)


def test_template_and_mask_mismatches_raise_naming_the_sample(processor):
    record = parse_conversation(SAMPLE)
    image = Image.new("RGB", (32, 32))
    args = (record.messages(), image, record.boxes)
    no_blocks = _with_template(
        processor, VICUNA_V1_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    with pytest.raises(LabelMaskingError, match=r"sample 's1': zero supervised tokens.*generation"):
        encode_conversation(no_blocks, *args, sample_id="s1")
    assert _supervised(no_blocks, encode_conversation(no_blocks, *args, assistant_mask="prefix")) == (
        " A red circle.</s> [10, 20, 300, 400]</s>"
    )
    # The generation prompt ends in a space the training text merges into the reply's first token (" A"): the
    # inference prompt is not a token prefix of the training sequence (LLaVA's "tokenization mismatch").
    trailing_space = _with_template(
        processor,
        VICUNA_V1_CHAT_TEMPLATE.replace(
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}", "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}"
        ),
    )
    with pytest.raises(LabelMaskingError, match=r"sample 's1'.*not a token prefix"):
        encode_conversation(trailing_space, *args, sample_id="s1")
    # The generation block also covers the role tag: labels would start before the inference prompt ends.
    role_in_block = _with_template(
        processor,
        VICUNA_V1_CHAT_TEMPLATE.replace("{{ 'ASSISTANT:' }}{% generation %}", "{% generation %}{{ 'ASSISTANT:' }}"),
    )
    with pytest.raises(LabelMaskingError, match=r"sample 's1'.*start at token"):
        encode_conversation(role_in_block, *args, sample_id="s1")
    with pytest.raises(LabelMaskingError, match="no assistant turn"):
        encode_conversation(processor, record.messages()[:1], image, record.boxes, sample_id="s1")


def test_long_samples_are_cut_or_skipped(processor, tmp_path):
    record = parse_conversation(SAMPLE)
    image = Image.new("RGB", (32, 32))
    full = encode_conversation(processor, record.messages(), image, record.boxes)
    first_reply_end = int((full.labels != IGNORE_INDEX).nonzero()[0]) + 3
    cut = encode_conversation(processor, record.messages(), image, record.boxes, max_length=first_reply_end)
    assert cut.truncated and len(cut.input_ids) == first_reply_end and len(cut.region_boxes) == 1
    with pytest.raises(SampleTooLong, match="cuts its image tokens"):
        encode_conversation(processor, record.messages(), image, record.boxes, max_length=20)
    with pytest.raises(SampleTooLong, match="cuts every reply"):
        encode_conversation(processor, record.messages(), image, record.boxes, max_length=first_reply_end - 3)


def test_dataset_skips_and_counts_unreadable_images_and_long_samples(processor, tmp_path):
    for name in ("ok.png", "ok2.png"):
        Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    long_text = "Describe the image in full detail please. " * 20
    samples = [
        {**SAMPLE, "id": "a", "image": "ok.png"},
        {**SAMPLE, "id": "bad", "image": "bad.png"},
        {**SAMPLE, "id": "gone", "image": "missing.png"},
        {
            "id": "long",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\n" + long_text}, {"from": "gpt", "value": "x"}],
        },
        {**SAMPLE, "id": "b", "image": "ok2.png"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(samples))
    dataset = ConversationDataset(read_conversations(tmp_path / "data.json"), processor, max_length=300)
    item = dataset[(0, 1)]
    assert item["id"] == "b" and len(item["skipped"]) == 2 and len(item["too_long"]) == 1
    assert "bad" in item["skipped"][0] and "gone" in item["skipped"][1] and "long" in item["too_long"][0]
    assert dataset[(1, 1)]["skipped"][0] == item["skipped"][0]  # the reason is remembered, not re-read
    assert dataset[0]["id"] == "a" and dataset[0]["skipped"] == []
    assert len(dataset.lengths) == 5 and dataset.lengths[3] > dataset.lengths[0]


# ----- batching ------------------------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_deterministic_resumable_and_groups():
    lengths = np.random.default_rng(0).integers(10, 500, size=96).tolist()
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=5, megabatch_batches=8)
    stream = iter(sampler)
    first = [next(stream) for _ in range(60)]  # 24 batches per epoch: crosses two epoch boundaries
    again = iter(LengthGroupedBatchSampler(lengths, 4, seed=5, megabatch_batches=8))
    assert [next(again) for _ in range(60)] == first
    resumed = iter(LengthGroupedBatchSampler(lengths, 4, seed=5, megabatch_batches=8, start=37))
    assert [next(resumed) for _ in range(23)] == first[37:]
    epoch0 = [i for batch in first[:24] for _, i in batch]
    assert sorted(epoch0) == list(range(96)) and first[24][0][0] == 1
    assert [i for _, i in first[24]] != [i for _, i in first[0]]
    other_seed = iter(LengthGroupedBatchSampler(lengths, 4, seed=6, megabatch_batches=8))
    assert [next(other_seed) for _ in range(24)] != first[:24]

    def spread(batches):
        return np.mean([np.ptp([lengths[i] for _, i in batch]) for batch in batches])

    random_batches = [[(0, int(i)) for i in chunk] for chunk in np.random.default_rng(1).permutation(96).reshape(24, 4)]
    assert spread(first[:24]) < 0.3 * spread(random_batches)
    ranks = [LengthGroupedBatchSampler(lengths, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 12
    seen = [i for position in range(12) for r in ranks for _, i in r.batch(0, position)]
    assert sorted(seen) == list(range(96))


def test_collate_pads_and_keeps_towers_busy(chat_tokenizer, processor):
    config = tiny_config(chat_tokenizer)
    torch.manual_seed(0)
    model = CLOCLlavaForConditionalGeneration._from_config(config).eval()
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    with_region = encode_conversation(processor, parse_conversation(SAMPLE).messages(), image, [[0.1, 0.2, 0.3, 0.4]])
    plain = parse_conversation({"id": "p", "image": "a.png", "conversations": SAMPLE["conversations"][2:]})
    no_region = encode_conversation(processor, plain.messages(), image)
    text_only = parse_conversation({"id": "t", "conversations": SAMPLE["conversations"][2:]})
    no_image = encode_conversation(processor, text_only.messages())

    def sample(encoded, name):
        return {
            "id": name,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": encoded.pixel_values,
            "region_boxes": encoded.region_boxes,
        }

    collate = CollateConfig(
        pad_token_id=chat_tokenizer.pad_token_id,
        image_token_id=config.image_token_id,
        region_token_id=config.region_token_id,
        image_seq_length=config.image_seq_length,
        image_size=32,
    )
    batch = collate_conversations([sample(no_image, "t"), sample(with_region, "r"), sample(no_region, "p")], collate)
    inputs = batch.inputs
    assert inputs["input_ids"].shape[0] == 3 and inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert inputs["region_image_index"].tolist() == [0]  # the region lies on the first image of the batch
    assert inputs["attention_mask"][0].sum() == len(no_image.input_ids)
    assert (inputs["labels"][inputs["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch.num_supervised == sum(
        int((e.labels[1:] != IGNORE_INDEX).sum()) for e in (no_image, with_region, no_region)
    )

    # A batch without images or regions gets masked stand-ins: the towers run, the loss does not change.
    for encoded in (no_image, no_region):
        busy = collate_conversations([sample(encoded, "x")], collate).inputs
        idle = collate_conversations(
            [sample(encoded, "x")], CollateConfig(**{**collate.__dict__, "keep_towers_busy": False})
        ).inputs
        assert "pixel_values" in busy and len(busy["region_boxes"]) == 1 and "region_boxes" not in idle
        with torch.no_grad():
            assert float(model(**busy).loss) == pytest.approx(float(model(**idle).loss), abs=1e-6)


def test_dataset_over_world_conversations(world, tmp_path, processor):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    assert main(["--data", str(data / "train.jsonl"), "--out", str(data / "conv.jsonl"), "--max-turns", "2"]) == 0
    dataset = ConversationDataset(read_conversations(data / "conv.jsonl"), processor, max_length=256)
    for index in range(0, len(dataset), 7):
        item = dataset[index]
        assert (item["labels"] != IGNORE_INDEX).any() and item["pixel_values"].shape == (1, 3, 32, 32)


def test_recipe_training_data_is_its_own_world(tmp_path):
    from train.mllm.synthetic_data import MLLM_WORLD, build_training_data, main

    data = build_training_data(tmp_path / "mllm", images=12)
    records = read_region_text(tmp_path / "mllm" / "train.jsonl")
    assert len(records) == 12 and not (tmp_path / "mllm" / "test.jsonl").exists()  # no held-out split here
    assert MLLM_WORLD.seed != 0 and MLLM_WORLD.min_objects == 1  # not the encoder world's stream (seed 0)
    # Stage 2's first phase: one grounding question per conversation, one per object, in the project's wording.
    grounding = read_conversations(data.grounding)
    assert len(grounding) == sum(len(r.regions) for r in records)
    assert {s.extra["task"] for s in grounding} == {"grounding"} and all(len(s.turns) == 2 for s in grounding)
    assert all(s.turns[0][1].split("\n")[-1].startswith("Where is") for s in grounding)
    samples = read_conversations(data.conversations)
    assert {s.extra["task"] for s in samples} <= {"grounding", "referring", "grounding+referring"}
    assert "grounding+referring" in {s.extra["task"] for s in samples}  # one conversation may ask both
    assert all(len(s.turns) <= 4 for s in samples)  # at most two questions per conversation
    assert all(s.image_path.is_file() for s in samples)
    assert main(["--out", str(tmp_path / "x"), "--images", "0"]) == 2
