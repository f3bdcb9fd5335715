"""Decoding in child processes (IMGDEDUP_DECODE_PROCESSES): the same answers as the decode threads
(SSCD vectors included, which the children compute themselves), dead letters that survive the trip
back, and a worker that outlives a decoder process dying."""

from __future__ import annotations

import base64
import io
import os
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from imgdedup import messages, metrics
from imgdedup.config import load_settings
from imgdedup.decode import decode
from imgdedup.errors import DeadLetterError, ErrorCode
from imgdedup.extract import DecodeProcesses, chunk_size, extract
from imgdedup.features import phash64
from imgdedup.fetch import Fetcher
from imgdedup.pipeline import FeatureExtractor


class KillsTheDecoder:
    """An image source whose unpickling ends the process that receives it, as a codec crashing on
    hostile bytes would (deterministic: no real crashing input is needed)."""

    def __reduce__(self):
        return os._exit, (70,)


def event(image: dict) -> messages.ImageEvent:
    return messages.parse_event(messages.encode({"event_id": "e", "image_id": "i", "image": image}))


@pytest.fixture(scope="module")
def settings(corpus_dir):
    return load_settings(file_roots=[str(corpus_dir)], decode_processes=2, sscd_enabled=False)


@pytest.fixture(scope="module")
def in_processes(settings):
    extractor = FeatureExtractor(settings, embedders=[])
    yield extractor
    extractor.close()


def test_processes_answer_what_the_threads_answer(settings, in_processes, corpus_files):
    on_threads = FeatureExtractor(settings.model_copy(update={"decode_processes": 0}), embedders=[])
    try:
        assert in_processes.processes is not None and on_threads.processes is None
        files = corpus_files[:11] + corpus_files[-1:]  # the last one's luma pHash differs from its RGB one
        sources = [{"uri": f.as_uri()} for f in files[:6]]
        sources += [{"data": base64.b64encode(f.read_bytes()).decode()} for f in files[6:]]

        def features(extractor):
            done = extractor.finish([f.result(timeout=60) for f in extractor.start([event(s) for s in sources])])
            return [(f.sha256, f.phash, f.low_detail, f.detail) for f in done]

        assert features(in_processes) == features(on_threads)
        # no embedder: JPEGs are decoded to their luma plane, and the verdicts say so
        luma = [phash64(decode(f.read_bytes(), settings, luma_only=True).image) for f in files]
        rgb = [phash64(decode(f.read_bytes(), settings).image) for f in files]
        assert [phash for _, phash, _, _ in features(in_processes)] == luma != rgb
        assert in_processes.versions == on_threads.versions == {"phash": "imagehash-phash-8x4+draft256+luma"}
    finally:
        on_threads.close()


@pytest.mark.parametrize("images,processes,size", [
    (1, 2, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (8, 2, 2), (16, 2, 2), (17, 2, 3), (64, 2, 8), (3, 4, 1),
    (5, 4, 2), (100, 1, 25),
])
def test_chunks_carry_two_images_or_more_unless_a_process_would_idle(images, processes, size):
    assert chunk_size(images, processes) == size


def test_dead_letters_come_back_from_the_child_with_their_code(in_processes, tmp_path):
    not_image, outside = in_processes.start([event({"data": base64.b64encode(b"plain text, not pixels").decode()}),
                                             event({"uri": (tmp_path / "x.jpg").as_uri()})])
    assert not_image.result(timeout=60).code is ErrorCode.NOT_AN_IMAGE
    assert outside.result(timeout=60).code is ErrorCode.URI_NOT_ALLOWED
    error = DeadLetterError(ErrorCode.DECODE_FAILED, "truncated")
    assert (pickle.loads(pickle.dumps(error)).code, str(pickle.loads(pickle.dumps(error)))) == (error.code, str(error))


@pytest.mark.parametrize("embed", [False, True], ids=["hash-only", "with-sscd"])
def test_an_image_that_kills_its_decoder_is_a_dead_letter_and_the_others_still_get_features(settings, corpus_files,
                                                                                           embed):
    if embed:
        pytest.importorskip("onnxruntime")
        settings = settings.model_copy(update={"sscd_enabled": True})
    procs = DecodeProcesses(settings, 2, embed=embed, min_side=settings.sscd_input_size if embed else 0)
    deaths = metrics.DECODER_DEATHS._value.get()
    try:
        good = [{"uri": f.as_uri()} for f in corpus_files[:8]]
        futures = procs.submit(good[:4] + [KillsTheDecoder()] + good[4:])  # in chunks of 2: one good image shares the killer's
        answers = [f.result(timeout=120) for f in futures]
        killer = answers.pop(4)
        assert isinstance(killer, DeadLetterError) and killer.code is ErrorCode.DECODE_FAILED
        assert all(not isinstance(a, DeadLetterError) for a in answers), answers
        assert all(set(a.vectors) == ({"sscd"} if embed else set()) for a in answers)  # the retried ones too
        assert metrics.DECODER_DEATHS._value.get() > deaths
        # the pool that replaced the broken one keeps working
        after = procs.submit([good[0]])[0].result(timeout=60)
        assert after.features.sha256 == answers[0].features.sha256
    finally:
        procs.close()


def test_sscd_runs_in_the_children_and_matches_the_threads(corpus_dir, corpus_files):
    pytest.importorskip("onnxruntime")
    settings = load_settings(file_roots=[str(corpus_dir)], decode_processes=2, sscd_enabled=True)
    in_children = FeatureExtractor(settings)
    on_threads = FeatureExtractor(settings.model_copy(update={"decode_processes": 0}))
    try:
        assert in_children.processes is not None and on_threads.processes is None
        assert in_children.layout() == "decode+hash+sscd in 2 decoder processes"
        assert on_threads.layout() == f"decode+hash on {settings.decode_threads} decode threads; sscd on the main thread"
        events = [event({"uri": f.as_uri()}) for f in corpus_files[:10]]
        events.insert(3, event({"data": base64.b64encode(b"GIF89a, then nothing").decode()}))
        prepared = [f.result(timeout=120) for f in in_children.start(events)]
        assert all(p.picture is None and set(p.vectors) == {"sscd"} for i, p in enumerate(prepared) if i != 3)
        got = in_children.finish(prepared)
        want = on_threads.finish([f.result(timeout=120) for f in on_threads.start(events)])
        assert isinstance(got[3], DeadLetterError) and isinstance(want[3], DeadLetterError)
        assert got[3].code is want[3].code
        del got[3], want[3]
        assert [(g.sha256, g.phash) for g in got] == [(w.sha256, w.phash) for w in want]
        # one ONNX thread per child and smaller batches: the same vectors up to float rounding
        np.testing.assert_allclose(np.stack([g.vectors["sscd"] for g in got]),
                                   np.stack([w.vectors["sscd"] for w in want]), atol=1e-4)
        assert got[0].versions == want[0].versions and "sscd" in got[0].versions
        # the embedders need colour, so the pHash comes from the RGB picture
        assert got[0].versions["phash"] == "imagehash-phash-8x4+draft256"
        assert got[0].phash == phash64(decode(corpus_files[0].read_bytes(), settings, min_side=settings.sscd_input_size).image)
    finally:
        in_children.close()
        on_threads.close()


def test_embedders_handed_in_keep_decoding_on_threads(settings):
    class Fixed:
        name, version, dim, in_decoder_processes = "fixed", "fixed-v1", 2, True

        def embed(self, images):
            return np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (len(images), 1))

    extractor = FeatureExtractor(settings, embedders=[Fixed()])
    try:
        assert extractor.processes is None  # the children could not build this very object
    finally:
        extractor.close()


def test_a_rejected_vector_becomes_a_dead_letter_and_its_batch_mates_keep_theirs():
    from PIL import Image

    from imgdedup.embedders.base import validate
    from imgdedup.extract import embed_pictures

    class NaNOnBlack:
        """Validates like the real embedders: a black picture yields a NaN row, which fails the whole batch."""

        name, version, dim, in_decoder_processes = "toy", "toy-v1", 2, True

        def embed(self, images):
            rows = [[np.nan, 0.0] if im.getpixel((0, 0)) == (0, 0, 0) else [0.6, 0.8] for im in images]
            return validate(np.array(rows, dtype=np.float32), self.dim)

    pictures = [Image.new("RGB", (4, 4), colour) for colour in ("white", "black", "red")]
    out, seconds = embed_pictures([NaNOnBlack()], pictures)
    assert isinstance(out[1], DeadLetterError) and out[1].code is ErrorCode.INTERNAL_ERROR
    assert "toy" in str(out[1])
    for good in (out[0], out[2]):
        np.testing.assert_allclose(good["toy"], [0.6, 0.8])
    assert seconds > 0


def test_warm_starts_every_decoder_process_before_the_first_image(settings):
    procs = DecodeProcesses(settings, 2)
    try:
        pids = procs.warm()
        assert len(pids) == 2 and os.getpid() not in pids
        assert procs.warm() == pids  # already warm: the same children answer
    finally:
        procs.close()


# --- hostile bytes ------------------------------------------------------------------------------

#: What a damaged or hostile file may become. INTERNAL_ERROR is not among them: it means an exception
#: that decode does not expect, i.e. a bug, and a replayable dead letter instead of a verdict.
HOSTILE_INPUT_CODES = {ErrorCode.NOT_AN_IMAGE, ErrorCode.DECODE_FAILED, ErrorCode.TOO_MANY_PIXELS}


@pytest.fixture(scope="module")
def format_seeds(corpus_files) -> list[bytes]:
    """One small picture in every format decode accepts, in the modes that take their own code paths."""
    from PIL import Image

    picture = Image.open(corpus_files[0])
    picture.thumbnail((96, 96))
    seeds = [corpus_files[0].read_bytes()]
    for fmt, mode, options in (("JPEG", "RGB", {"progressive": True}), ("JPEG", "CMYK", {}), ("JPEG", "L", {}),
                               ("PNG", "RGBA", {}), ("PNG", "I;16", {}), ("GIF", "P", {}), ("WEBP", "RGB", {}),
                               ("BMP", "RGB", {}), ("TIFF", "RGB", {"compression": "tiff_deflate"})):
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, fmt, **options)
        seeds.append(buffer.getvalue())
    return seeds


#: (kind, where as a fraction of the file, a byte or a length)
MUTATIONS = st.lists(st.tuples(st.sampled_from(("set", "delete", "truncate", "repeat", "header")),
                               st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


def mutated(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = int(where * len(out))
        if kind == "set":
            out[at] = value
        elif kind == "delete":
            del out[at:at + 1 + value]
        elif kind == "truncate":
            del out[max(1, at):]
        elif kind == "repeat":
            out[at:at] = out[at:at + 1 + value]
        else:  # the first bytes hold the headers: sizes, component counts, offsets
            out[int(where * min(len(out), 64))] = value
        if len(out) < 2:
            break
    return bytes(out)


@given(seed=st.integers(0, 9), mutations=MUTATIONS, luma=st.booleans())
@hyp_settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_files_in_every_format_get_a_verdict_or_a_specific_dead_letter(format_seeds, settings, seed,
                                                                             mutations, luma):
    data = mutated(format_seeds[seed], mutations)
    result, _ = extract(data, Fetcher(settings), settings, min_side=0 if luma else 224)
    if isinstance(result, DeadLetterError):
        assert result.code in HOSTILE_INPUT_CODES, result
    else:
        assert 0 <= result.features.phash < 2**64 and len(result.features.sha256) == 64
