"""The conditional learner (FiLM from support set + task description) and the
description tokenizer: the metric learners' interface tests, a finite-difference
check of the FiLM generator, save/load, description sensitivity, config errors."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from metatransfer.algorithms import _adapt, build_algorithm
from metatransfer.algorithms.conditional import Conditional, ConditionalHparams, FilmGenerator
from metatransfer.artifacts import load_learner, save_learner
from metatransfer.config import params_from_mapping
from metatransfer.descriptions import (
    DESCRIPTION_FILE,
    NO_DESCRIPTION,
    RESERVED,
    build_vocabulary,
    read_description,
    tokenize,
    word_hash,
    write_description,
)
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec
from tests.unit import test_adapt_shared as shared
from tests.unit import test_metric_algorithms as metric

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=8)
BRAIN = {"modality": "MRI", "anatomy": "brain", "text": "axial T1 slices, tumour type"}
SKIN = {"modality": "dermoscopy", "anatomy": "skin", "text": "melanoma versus naevus"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(**hparams: object) -> Conditional:
    learner = build_algorithm("conditional", TINY, 4, dict(hparams))
    assert isinstance(learner, Conditional)
    return learner


def film_on(learner: Conditional, value: float = 1.0) -> Conditional:
    """Post-multipliers λ away from their 0 start, so FiLM depends on the task."""
    with torch.no_grad():
        learner.generator.gamma_scale.fill_(value)
        learner.generator.beta_scale.fill_(value)
    return learner


# ---------------------------------------------------------------- the metric learners' interface tests


@pytest.mark.parametrize("test", [
    shared.test_bad_support_labels_name_the_algorithm,
    shared.test_a_float64_learner_adapts_float32_images,
    shared.test_metric_predictor_runs_in_eval_mode_without_grad_and_restores_flags,
    metric.test_registry_resolves_each_metric_learner,
    metric.test_a_class_without_support_example_is_an_episode_error,
    metric.test_same_seed_gives_the_same_weights_and_steps,
    metric.test_loss_decreases_on_a_toy_task,
], ids=lambda f: f.__name__)
def test_conditional_passes_the_metric_learner_tests(test) -> None:
    kwargs = {"hparams": {}} if "hparams" in test.__code__.co_varnames[: test.__code__.co_argcount] else {}
    test("conditional", **kwargs)


@pytest.mark.parametrize("start_training", [True, False])
def test_adapt_leaves_weights_and_modes_unchanged(start_training: bool) -> None:
    metric.test_adapt_leaves_weights_and_train_eval_modes_unchanged("conditional", start_training)


def test_is_a_metric_learner_with_a_backbone_for_finetuning() -> None:
    learner = build()
    assert isinstance(learner, _adapt.MetricLearner)
    assert Conditional.adapt is _adapt.SupportLearner.adapt
    assert Conditional.adapt_support is _adapt.MetricLearner.adapt_support
    assert learner.backbone.out_dim == 8  # what finetune copies into the target model


def test_meta_batch_loss_is_the_mean_of_the_episode_losses() -> None:
    torch.manual_seed(0)
    algo = film_on(build(), 0.5).double().eval()
    algo.set_description(BRAIN)
    gen = torch.Generator().manual_seed(0)
    eps = [metric.quadrant_episode(gen, k_shot=k) for k in (1, 3)]
    eps = [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.n_way) for e in eps]
    single = [algo.meta_learn([e]) for e in eps]
    both = algo.meta_learn(eps)
    assert both.loss == pytest.approx((single[0].loss + single[1].loss) / 2, rel=1e-9)


def test_film_starts_as_the_identity_so_step_zero_is_protonet() -> None:
    torch.manual_seed(0)
    algo = build().eval()
    ep = metric.quadrant_episode(torch.Generator().manual_seed(0))
    algo.set_description(BRAIN)
    logits = algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)
    with torch.no_grad():
        emb = algo.backbone(ep.query_x)
        protos = torch.stack([algo.backbone(ep.support_x)[ep.support_y == k].mean(0) for k in range(4)])
    expected = -((emb[:, None] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the FiLM generator


@pytest.mark.parametrize("fusion", ["attention", "mean"])
def test_film_generator_gradients_match_finite_differences(fusion: str) -> None:
    torch.manual_seed(0)
    hp = ConditionalHparams(dim=4, heads=2, vocab_size=4, hash_buckets=3, fusion=fusion)
    gen = FilmGenerator(feature_dim=5, channels=[3, 2], hp=hp).double()
    with torch.no_grad():
        gen.gamma_scale.fill_(0.7)
        gen.beta_scale.fill_(-0.3)
    ids = torch.tensor([2, 5, 7])
    prototypes = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def flat(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cat([g, b], 1) for g, b in gen(p, ids)], 1)

    assert torch.autograd.gradcheck(flat, (prototypes,), eps=1e-6, atol=1e-5)
    # ... and with respect to the generator's own weights (the description table included).
    names = ["set_proj.weight", "tokens.weight", "gamma_nets.0.0.weight"]
    if fusion == "attention":
        names += ["attention.in_proj_weight", "task_query"]
    params = dict(gen.named_parameters())
    for name in names:
        weight = params[name].detach().clone().requires_grad_(True)

        def of_weight(w: torch.Tensor, name: str = name) -> torch.Tensor:
            out = torch.func.functional_call(gen, {name: w}, (prototypes.detach(), ids))
            return torch.cat([torch.cat([g, b], 1) for g, b in out], 1)

        assert torch.autograd.gradcheck(of_weight, (weight,), eps=1e-6, atol=1e-5), name


def test_description_changes_the_prediction_only_when_used() -> None:
    ep = metric.quadrant_episode(torch.Generator().manual_seed(0))
    outputs = {}
    for use in (True, False):
        torch.manual_seed(0)
        algo = film_on(build(use_description=use)).eval()
        algo.set_vocabulary([BRAIN, SKIN])
        answers = []
        for description in (BRAIN, SKIN, None):
            algo.set_description(description)
            answers.append(algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x))
        outputs[use] = answers
    brain, skin, none = outputs[True]
    # Untrained tiny features give logits of order 1e-5: compare relatively.
    assert not torch.allclose(brain, skin, rtol=1e-2, atol=0) and not torch.allclose(brain, none, rtol=1e-2, atol=0)
    brain, skin, none = outputs[False]
    assert torch.equal(brain, skin) and torch.equal(brain, none)


def test_episodes_take_their_source_description_from_the_class_ids() -> None:
    algo = build()
    algo.set_source_descriptions([(0, 10), (10, 25)], [BRAIN, None])
    algo.set_description(SKIN)
    ep = metric.quadrant_episode(torch.Generator().manual_seed(0))
    assert algo.episode_description(Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 4,
                                            classes=torch.tensor([3, 1, 0, 2]))) == BRAIN
    assert algo.episode_description(Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 4,
                                            classes=torch.tensor([12, 11, 10, 13]))) is None
    # outside every range, or without class ids: the adaptation-time description
    assert algo.episode_description(Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 4,
                                            classes=torch.tensor([30, 31, 32, 33]))) == SKIN
    assert algo.episode_description(Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 4)) == SKIN
    with pytest.raises(ConfigError, match=r"2 class ranges but 1 descriptions"):
        algo.set_source_descriptions([(0, 10), (10, 25)], [BRAIN])


def test_meta_learn_conditions_each_episode_on_its_source() -> None:
    """Two episodes with the same images but sources with different descriptions get different losses."""
    torch.manual_seed(0)
    algo = film_on(build()).double().eval()
    algo.set_vocabulary([BRAIN, SKIN])
    algo.set_source_descriptions([(0, 4), (4, 8)], [BRAIN, SKIN])
    e = metric.quadrant_episode(torch.Generator().manual_seed(0))
    first = Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, 4, classes=e.classes)
    second = Episode(first.support_x, first.support_y, first.query_x, first.query_y, 4, classes=e.classes + 4)
    a, b = algo.meta_learn([first]), algo.meta_learn([second])
    assert a.loss != pytest.approx(b.loss, rel=1e-9)


# ---------------------------------------------------------------- save / load / serve


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    algo = film_on(build(fusion="attention"), 0.3)
    metric.train(algo, [metric.quadrant_episode(torch.Generator().manual_seed(s)) for s in range(2)])
    algo.set_vocabulary([BRAIN, SKIN])
    save_learner(algo, tmp_path / "m")
    loaded = load_learner(tmp_path / "m")
    assert isinstance(loaded, Conditional)
    assert loaded.vocabulary() == algo.vocabulary() and len(loaded.vocabulary().hashes) == 12  # 7 + 5 words
    ep = metric.quadrant_episode(torch.Generator().manual_seed(5))
    target = {"modality": "ultrasound", "anatomy": "breast"}  # words the vocabulary never saw
    for learner in (algo, loaded):
        learner.set_description(target)
    expected = algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)
    assert torch.equal(loaded.adapt(ep.support_x, ep.support_y, 4)(ep.query_x), expected)


def test_few_shot_model_serves_it_with_and_without_a_description(tmp_path: Path) -> None:
    from metatransfer.serving.few_shot_model import FewShotPredictor

    torch.manual_seed(0)
    algo = film_on(build())
    algo.set_vocabulary([BRAIN, SKIN])
    save_learner(algo, tmp_path / "m")
    served = FewShotPredictor(tmp_path / "m")
    ep = metric.quadrant_episode(torch.Generator().manual_seed(1))
    request = {"support_x": ep.support_x.numpy(), "support_y": ep.support_y.numpy(), "query_x": ep.query_x.numpy()}
    plain = served.predict(dict(request))
    described = served.predict({**request, "description": "MRI brain axial T1 slices"})
    algo.eval()
    algo.set_description({"text": "MRI brain axial T1 slices"})
    probs = torch.softmax(algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x), 1)
    assert described["prob_0"].to_numpy() == pytest.approx(probs[:, 0].double().numpy(), abs=1e-6)
    assert abs(plain["prob_0"].to_numpy() - described["prob_0"].to_numpy()).max() > 1e-6
    as_param = served.predict(dict(request), params={"description": "MRI brain axial T1 slices"})
    assert as_param["prob_0"].tolist() == described["prob_0"].tolist()
    with pytest.raises(Exception, match=r"description: expected one string, found 2 items"):
        served.predict({**request, "description": ["a", "b"]})
    # the description is per request: the next one without it answers as the first
    assert served.predict(dict(request))["prob_0"].tolist() == plain["prob_0"].tolist()


# ---------------------------------------------------------------- descriptions and tokens


def test_tokenizer_and_hash_are_deterministic_and_unseen_words_land_in_the_buckets() -> None:
    assert tokenize("Axial T1-weighted MRI, 3 mm") == ["axial", "t1", "weighted", "mri", "3", "mm"]
    # A stable hash (BLAKE2b, not Python's per-process salted hash()): the same value in any process.
    assert word_hash("mri") == int.from_bytes(hashlib.blake2b(b"mri", digest_size=8).digest(), "little") >> 1
    assert 0 <= word_hash("mri") < 2**63
    vocab = build_vocabulary([BRAIN, SKIN, None], size=8, buckets=5)
    assert len(vocab.hashes) == 8 and vocab.n_ids == RESERVED + 8 + 5
    # The most frequent words first, ties alphabetical: every word occurs once here.
    assert vocab.hashes[0] == word_hash("axial")
    ids = vocab.encode({"text": "axial zebra quokka"}, max_tokens=10)
    assert ids[0] == RESERVED  # "axial": the first known slot
    assert all(RESERVED + 8 <= i < vocab.n_ids for i in ids[1:])  # unseen: hash buckets, in range
    assert ids == vocab.encode({"text": "axial zebra quokka"}, max_tokens=10)
    assert vocab.encode(None, 10) == [NO_DESCRIPTION] and vocab.encode({"text": "axial zebra"}, 1) == [RESERVED]
    assert build_vocabulary([SKIN, BRAIN], 8, 5) == vocab.__class__(
        build_vocabulary([BRAIN, SKIN], 8, 5).hashes, 8, 5)


def test_description_file_round_trip(tmp_path: Path) -> None:
    path = write_description(tmp_path, {"modality": "MRI", "anatomy": "", "domain": "", "text": "Axial T1"})
    assert path.name == DESCRIPTION_FILE
    assert json.loads(path.read_text()) == {"description": {"modality": "MRI", "text": "Axial T1"},
                                            "tokens": ["mri", "axial", "t1"]}
    assert read_description(tmp_path) == {"modality": "MRI", "text": "Axial T1"}
    assert read_description(tmp_path / "missing") is None
    path.write_text("{}")
    with pytest.raises(ConfigError, match=r"description.json: not a description file"):
        read_description(tmp_path)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(("hparams", "message"), [
    ({"fusion": "sum"}, r"meta_train\.hparams\.conditional\.fusion: must be one of \['attention', 'mean'\], found 'sum'"),
    ({"heads": 3}, r"meta_train\.hparams\.conditional\.heads: must divide dim \(64\), found 3"),
    ({"dim": 0}, r"meta_train\.hparams\.conditional\.dim: must be >= 1, found 0"),
    ({"use_description": "yes"}, r"meta_train\.hparams\.conditional\.use_description: expected bool, found str"),
    ({"film_l2": -1.0}, r"meta_train\.hparams\.conditional\.film_l2: must be >= 0, found -1.0"),
    ({"colour": 1}, r"meta_train\.hparams\.conditional: unknown key\(s\) \['colour'\]"),
])
def test_bad_hparams_are_refused_at_params_validation(hparams: dict, message: str) -> None:
    raw = minimal_params()
    raw["meta_train"]["hparams"] = {"conditional": hparams}
    with pytest.raises(ConfigError, match=message):
        params_from_mapping(raw)


def test_other_backbones_are_refused() -> None:
    spec = BackboneSpec(name="resnet18", in_channels=3, image_size=32, hidden=8)
    with pytest.raises(ConfigError, match=r"conditional: FiLM conditioning is implemented for the conv4 backbone only"):
        build_algorithm("conditional", spec, 4, {})


def minimal_params() -> dict:
    import yaml

    raw = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["meta_train"]["algorithms"] = [*raw["meta_train"]["algorithms"], "conditional"]
    return raw


def test_descriptions_in_params_are_validated_by_name() -> None:
    raw = minimal_params()
    target = raw["finetune"]["targets"][0]
    raw["prepare"]["descriptions"] = {target: {"modality": "MRI", "anatomy": "brain"}}
    params = params_from_mapping(raw)
    assert params.prepare.descriptions[target].modality == "MRI"
    bad = copy.deepcopy(raw)
    bad["prepare"]["descriptions"] = {"nosuch": {"text": "x"}}
    with pytest.raises(ConfigError, match=r"prepare\.descriptions\.nosuch: 'nosuch' is not a dataset prepare builds"):
        params_from_mapping(bad)
    bad["prepare"]["descriptions"] = {target: {"organ": "brain"}}
    with pytest.raises(ConfigError, match=rf"prepare\.descriptions\.{target}: unknown key\(s\) \['organ'\]"):
        params_from_mapping(bad)
    bad["prepare"]["descriptions"] = {target: {"text": " -- "}}
    with pytest.raises(ConfigError, match=rf"prepare\.descriptions\.{target}: the description has no word"):
        params_from_mapping(bad)
    bad["prepare"]["descriptions"] = {target: {"text": 3}}
    with pytest.raises(ConfigError, match=rf"prepare\.descriptions\.{target}\.text: expected str, found int"):
        params_from_mapping(bad)


def test_prepare_writes_a_description_only_for_a_described_dataset(tmp_path: Path) -> None:
    from metatransfer.config import DescriptionParams, ImageFolderParams, PrepareParams
    from metatransfer.data import prepare as prep
    from tests.unit.test_prepare import _tree

    _tree(tmp_path / "t", {"a": 5, "b": 5})
    _tree(tmp_path / "u", {"a": 5, "b": 5}, k=50)
    folders = {"tgt": ImageFolderParams(str(tmp_path / "t"), "target", (0.6, 0.2, 0.2)),
               "other": ImageFolderParams(str(tmp_path / "u"), "target", (0.6, 0.2, 0.2))}
    base = dict(image_size=16, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=0,
                image_folders=folders)
    prep.prepare(PrepareParams(**base), ("tgt", "other"), tmp_path / "raw", tmp_path / "plain", seed=0)
    described = PrepareParams(**base, descriptions={"tgt": DescriptionParams(modality="MRI", text="Axial T1")})
    prep.prepare(described, ("tgt", "other"), tmp_path / "raw", tmp_path / "desc", seed=0)
    assert read_description(tmp_path / "desc" / "tgt") == {"modality": "MRI", "text": "Axial T1"}
    assert not (tmp_path / "plain" / "tgt" / DESCRIPTION_FILE).exists()
    assert not (tmp_path / "desc" / "other" / DESCRIPTION_FILE).exists()
    # Everything else is byte-identical to the undescribed store.
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "desc") for p in (tmp_path / "desc").rglob("*")
                           if p.is_file() and p.name != DESCRIPTION_FILE)
    for rel in files:
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "desc" / rel).read_bytes(), rel


def test_the_meta_train_stage_hands_each_source_its_description() -> None:
    """give_descriptions: the conditional learner gets the vocabulary, the per-source ranges and the
    first source's description; other learners are untouched."""
    from metatransfer.data.store import SplitData
    from metatransfer.training.sources import give_descriptions, mixed_source_sampler

    def split(name: str, classes: int) -> SplitData:
        labels = torch.arange(classes).repeat_interleave(3).numpy()
        images = (torch.rand(len(labels), 1, 16, 16) * 255).to(torch.uint8).numpy()
        return SplitData(name, "meta_train", images, labels, tuple(f"c{i}" for i in range(classes)))

    sampler = mixed_source_sampler([split("a", 5), split("b", 6)], [1.0, 1.0], 4, 1, 1, seed=0,
                                   rotation_augment=False)
    assert sampler.class_ranges == ((0, 5), (5, 11))
    learner = build()
    assert give_descriptions(learner, sampler, [BRAIN, None])
    assert learner._source_ranges == [(0, 5), (5, 11)] and learner._description == BRAIN
    assert len(learner.vocabulary().hashes) == 7
    for _ in range(6):
        ep = sampler.sample()
        assert learner.episode_description(ep) == (BRAIN if int(ep.classes[0]) < 5 else None)
    protonet = build_algorithm("protonet", TINY, 4, {})
    assert not give_descriptions(protonet, sampler, [BRAIN, None])


def test_the_guide_example_is_valid_params() -> None:
    import yaml

    guide = (Path(__file__).parents[2] / "docs" / "guide.md").read_text()
    start = guide.index("### Task descriptions and the conditional learner")
    block = guide[guide.index("```yaml\n", start) + 8: guide.index("```\n", guide.index("```yaml\n", start) + 8)]
    raw = minimal_params()
    raw["prepare"]["descriptions"] = yaml.safe_load(block)["prepare"]["descriptions"]
    params = params_from_mapping(raw)
    assert params.prepare.descriptions["brain_tumor_mri"].text == "axial T1 slices, tumour type"


def test_meta_train_stage_core_trains_it_on_described_sources(tmp_path: Path) -> None:
    """`stages.meta_train.train_one` reads each source's description.json from the store and the learner
    meta-trains on them (two sources); without the files it trains on the "no description" token."""
    import yaml

    from metatransfer.stages.meta_train import train_one
    from tests.unit.test_small_classes import write_dataset

    raw = yaml.safe_load((Path(__file__).parents[2] / "scenarios" / "characters.yaml").read_text())
    raw["prepare"].update(image_size=16, channels=1)
    raw["model"]["hidden"] = 4
    raw["meta_train"].update(algorithms=["conditional"], sources=[{"dataset": "omni", "weight": 1.0},
                                                                  {"dataset": "faces", "weight": 1.0}],
                             n_way=3, k_shot=1, n_query=3, steps=3, val_every=3, val_episodes=2,
                             meta_batch_size=2, rotation_augment=False, init="scratch")
    raw["finetune"]["methods"] = ["conditional", "scratch"]
    params = params_from_mapping(raw)
    states = {}
    for described in (True, False):
        prepared = tmp_path / str(described)
        write_dataset(prepared, "omni", {"meta_train": [8] * 6, "meta_val": [8] * 4}, seed=1)
        write_dataset(prepared, "faces", {"meta_train": [8] * 5, "meta_val": [8] * 4}, seed=2)
        if described:
            write_description(prepared / "omni", {"domain": "handwritten characters"})
            write_description(prepared / "faces", {"domain": "faces", "text": "portrait photographs"})
        result = train_one("conditional", params, prepared)
        learner = result.learner
        assert result.steps_done == 3 and result.faults == 0
        assert learner._source_ranges == [(0, 6), (6, 11)]
        assert len(learner.vocabulary().hashes) == (5 if described else 0)
        assert learner._description == ({"domain": "handwritten characters"} if described else None)
        states[described] = {k: v.clone() for k, v in learner.state_dict().items()}
    # The same seed and episodes: only the descriptions differ, and so do the trained description embeddings.
    assert not torch.equal(states[True]["generator.tokens.weight"], states[False]["generator.tokens.weight"])


def test_a_logged_learner_takes_the_description_as_an_mlflow_param(tmp_path: Path, monkeypatch) -> None:
    """Through MLflow (log, load, predict): the signature declares `description`, so it reaches the learner."""
    import mlflow

    from metatransfer import tracking
    from metatransfer.artifacts import load_pyfunc_model
    from metatransfer.serving.few_shot_model import FewShotPredictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    algo = film_on(build())
    algo.set_vocabulary([BRAIN, SKIN])
    save_learner(algo, tmp_path / "m")
    ep = metric.quadrant_episode(torch.Generator().manual_seed(1))
    request = {"support_x": ep.support_x.numpy(), "support_y": ep.support_y.numpy(), "query_x": ep.query_x.numpy()}
    direct = FewShotPredictor(tmp_path / "m")
    described = direct.predict(dict(request), params={"description": "MRI brain axial T1 slices"})
    plain = direct.predict(dict(request))
    tracking.configure(tmp_path / "project")
    with mlflow.start_run():
        uri = tracking.log_few_shot_model(tmp_path / "m", 1, ep.support_x.shape[-1], name="learner")
    model = load_pyfunc_model(uri, tmp_path / "loaded")
    via_mlflow = model.predict(dict(request), params={"description": "MRI brain axial T1 slices"})
    assert via_mlflow["prob_0"].tolist() == described["prob_0"].tolist()
    assert model.predict(dict(request))["prob_0"].tolist() == plain["prob_0"].tolist()


def test_evaluate_conditions_the_learner_on_the_episode_sets_dataset(tmp_path: Path) -> None:
    """learners.describe (called by `evaluate` per episode set): the dataset's description.json, or
    the "no description" token for a dataset without one; other learners are left alone."""
    from metatransfer.descriptions import write_description
    from metatransfer.learners import describe

    torch.manual_seed(0)
    algo = film_on(build())
    algo.set_vocabulary([BRAIN, SKIN])
    ep = metric.quadrant_episode(torch.Generator().manual_seed(1))
    described, plain = tmp_path / "brain", tmp_path / "other"
    described.mkdir()
    plain.mkdir()
    write_description(described, {"modality": "MRI", "anatomy": "brain", "text": "axial T1 slices"})

    def answer() -> list[float]:
        algo.eval()
        return algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)[:, 0].tolist()

    describe(algo, described)
    with_desc = answer()
    algo.set_description({"modality": "MRI", "anatomy": "brain", "text": "axial T1 slices"})
    assert answer() == with_desc
    describe(algo, plain)
    assert algo._description is None and answer() != with_desc
    proto = build_algorithm("protonet", TINY, 4, None)
    describe(proto, described)  # no set_description: nothing happens, no error
    assert not hasattr(proto, "_description")
