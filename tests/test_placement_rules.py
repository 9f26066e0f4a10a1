"""Placement rules without a broker: intake (validity, signatures, replay, newest wins), the plan
(start, keep, retire; what is saved), and two versions of one model side by side (keys, which tenant
a frame reaches). The end-to-end placement tests over MQTT stay the safety net."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.frames.tenant_table import TenantTable, resolve_key
from agent.observability.homeassistant import HomeAssistant
from agent.placement.intake import Accepted, Applied, Intake, Redelivery, Refused, newest
from agent.placement.plan import check_generation, plan, to_save
from agent.placement.reconciler import check_runnable
from agent.protocol.schemas import InferResult, Placement, TenantRef, TenantSpec, Timing, TopK
from agent.protocol.signing import sign
from agent.protocol.topics import Topics
from agent.service.config import HomeAssistantConfig
from agent.service.errors import PlacementRefused
from agent.service.model_repo import ModelRepository
from tests.conftest import MODELS

NOW = 1_800_000_000.0


def doc(generation: int, *models: str, **tenant: object) -> dict:
    return {"generation": generation, "tenants": [{"model": m, **tenant} for m in models]}


def raw(document: dict) -> bytes:
    return json.dumps(document).encode()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(document: dict, key: Ed25519PrivateKey, at: float = NOW, valid_s: float = 3600.0) -> dict:
    return sign(document, key, valid_s=valid_s, now=at)


# -- intake, unsigned devices ------------------------------------------------------------------------
def test_valid_document_is_accepted():
    outcome = Intake().check(raw(doc(3, "efficientnet-lite0")), Applied(), now=NOW)
    assert isinstance(outcome, Accepted)
    assert outcome.placement.generation == 3
    assert outcome.placement.tenants[0].backend == "onnxruntime"  # the schema's default


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe", b""])
def test_unparseable_document_is_refused_without_generation(payload):
    outcome = Intake().check(payload, Applied(), now=NOW)
    assert isinstance(outcome, Refused)
    assert outcome.generation is None
    assert outcome.reason.startswith("invalid JSON")


def test_schema_error_is_refused_with_its_generation_and_field():
    outcome = Intake().check(raw(doc(9, "efficientnet-lite0", instances=0)), Applied(), now=NOW)
    assert isinstance(outcome, Refused)
    assert outcome.generation == 9
    assert "tenants.0.instances" in outcome.reason


def test_unknown_field_is_refused():
    outcome = Intake().check(raw({**doc(2, "m"), "tenantz": []}), Applied(), now=NOW)
    assert isinstance(outcome, Refused) and "tenantz" in outcome.reason


# -- intake, devices that require signatures -----------------------------------------------------------
def test_signed_document_is_accepted(key):
    intake = Intake(key.public_key(), max_age_s=86400)
    outcome = intake.check(raw(signed(doc(5, "m"), key)), Applied(4, "old"), now=NOW + 10)
    assert isinstance(outcome, Accepted)
    assert outcome.placement.signature


def test_unsigned_document_is_refused(key):
    outcome = Intake(key.public_key()).check(raw(doc(5, "m")), Applied(), now=NOW)
    assert isinstance(outcome, Refused)
    assert outcome.generation == 5
    assert outcome.reason.startswith("signature: unsigned")


def test_document_signed_by_another_key_is_refused(key):
    other = Ed25519PrivateKey.generate()
    outcome = Intake(key.public_key()).check(raw(signed(doc(5, "m"), other)), Applied(), now=NOW)
    assert isinstance(outcome, Refused) and "forged or altered" in outcome.reason


def test_altered_document_is_refused(key):
    document = signed(doc(5, "m"), key)
    document["tenants"][0]["instances"] = 4
    outcome = Intake(key.public_key()).check(raw(document), Applied(), now=NOW)
    assert isinstance(outcome, Refused) and "forged or altered" in outcome.reason


def test_expired_document_is_refused(key):
    document = signed(doc(5, "m"), key, valid_s=60)
    outcome = Intake(key.public_key()).check(raw(document), Applied(), now=NOW + 61)
    assert isinstance(outcome, Refused) and "expired" in outcome.reason


def test_document_older_than_max_age_is_refused(key):
    document = signed(doc(5, "m"), key, valid_s=10 * 86400)
    outcome = Intake(key.public_key(), max_age_s=3600).check(raw(document), Applied(), now=NOW + 7200)
    assert isinstance(outcome, Refused) and "older than the 3600s allowed" in outcome.reason


def test_applied_document_redelivered_after_expiry_is_not_a_refusal(key):
    """The retained copy comes back on every reconnect, also after it expired."""
    document = signed(doc(5, "m"), key, valid_s=60)
    applied = Applied(5, document["signature"])
    outcome = Intake(key.public_key()).check(raw(document), applied, now=NOW + 3600)
    assert outcome == Redelivery(5)


def test_same_generation_signed_again_is_a_replay(key):
    first = signed(doc(5, "m"), key)
    second = signed(doc(5, "m", instances=2), key, at=NOW + 1)
    outcome = Intake(key.public_key()).check(raw(second), Applied(5, first["signature"]), now=NOW + 2)
    assert isinstance(outcome, Refused) and "replayed: generation 5 is already applied" in outcome.reason


def test_older_generation_is_a_replay(key):
    outcome = Intake(key.public_key()).check(raw(signed(doc(3, "m"), key)), Applied(5, "sig"), now=NOW)
    assert isinstance(outcome, Refused) and "older than the applied 5" in outcome.reason


# -- newest valid wins ---------------------------------------------------------------------------------
def test_newest_valid_document_wins_over_a_bad_one_behind_it():
    intake = Intake()
    outcomes = [
        intake.check(raw(doc(7, "a")), Applied(), now=NOW),
        intake.check(raw(doc(9, "b")), Applied(), now=NOW),
        intake.check(b"garbage", Applied(), now=NOW),
    ]
    best = newest(outcomes)
    assert best is not None and best.generation == 9


def test_of_equal_generations_the_later_wins():
    intake = Intake()
    outcomes = [intake.check(raw(doc(4, m)), Applied(), now=NOW) for m in ("first", "second")]
    best = newest(outcomes)
    assert best is not None and best.tenants[0].model == "second"


def test_no_valid_document_means_nothing_to_apply():
    assert newest([Refused(None, "x"), Redelivery(3)]) is None


# -- plan ----------------------------------------------------------------------------------------------
def spec(model: str, **fields: object) -> TenantSpec:
    return TenantSpec(model=model, **fields)


def test_plan_starts_new_keeps_same_retires_gone_and_forgets_failed():
    running = {"a": spec("a"), "b": spec("b"), "gone": spec("gone")}
    desired = Placement(generation=2, tenants=[spec("a"), spec("b", instances=2), spec("new")])
    steps = plan(desired, running, failed=frozenset({"new", "old-failure"}))
    assert steps.keep == ["a"]
    assert [s.model for s in steps.start] == ["b", "new"]  # b changed: a new tenant, make-before-break
    assert steps.retire == ["gone"]
    assert steps.forget == ["old-failure"]


def test_device_names_compare_case_insensitively():
    steps = plan(Placement(tenants=[spec("a", device="CPU")]), {"a": spec("a", device="cpu")})
    assert steps.keep == ["a"] and not steps.start


@pytest.mark.parametrize(
    "change", [{"backend": "openvino"}, {"threads": 2}, {"precision": "fp16"}, {"batch": {"max_size": 8}}]
)
def test_any_spec_change_starts_a_new_tenant(change):
    steps = plan(Placement(tenants=[spec("a", **change)]), {"a": spec("a")})
    assert [s.model for s in steps.start] == ["a"] and not steps.keep


def test_generations_only_go_forward():
    check_generation(5, None)
    check_generation(5, 5)  # the same document again (unsigned, retained): applied again, harmlessly
    with pytest.raises(PlacementRefused, match="older than the applied 6"):
        check_generation(5, 6)


def test_saved_copy_keeps_the_tenant_that_served_after_a_failed_move():
    asked = Placement(generation=3, tenants=[spec("a", backend="openvino", device="CPU"), spec("b")])
    serving = {"a": spec("a"), "b": spec("b")}  # the move of a to OpenVINO failed; a still on onnxruntime
    saved = to_save(asked, asked, serving)
    assert [(t.model, t.backend) for t in saved.tenants] == [("a", "onnxruntime"), ("b", "onnxruntime")]
    assert saved.generation == 3


def test_saved_copy_keeps_auto_and_the_signature_as_asked():
    asked = Placement(generation=3, tenants=[spec("a", backend="auto", device="auto")], signature="sig")
    resolved = Placement(generation=3, tenants=[spec("a", backend="openvino", device="CPU")])
    saved = to_save(asked, resolved, {"a": spec("a", backend="openvino", device="CPU")})
    assert saved.tenants[0].backend == "auto" and saved.signature == "sig"


def test_saved_copy_of_a_model_that_never_started_is_as_asked():
    asked = Placement(generation=1, tenants=[spec("a", backend="tflite")])
    saved = to_save(asked, asked, {})
    assert saved.tenants[0].backend == "tflite"


# -- two versions of one model side by side (docs/protocol.md "Two versions side by side") -----------
@pytest.mark.parametrize(
    ("tenants", "refusal"),
    [
        ([{}, {"version": "2"}], None),  # the newest beside a pinned one
        ([{"version": "1"}, {"version": "2"}], None),  # two pinned versions
        ([{}, {}], "without a version appears twice"),
        ([{"version": "2"}, {"version": "2"}], "version '2' appears twice"),
    ],
)
def test_intake_takes_two_versions_of_one_model_and_refuses_one_version_twice(tenants, refusal):
    document = {"generation": 4, "tenants": [{"model": "efficientnet-lite0", **t} for t in tenants]}
    outcome = Intake().check(raw(document), Applied(), now=NOW)
    if refusal is None:
        assert isinstance(outcome, Accepted)
        keys = [t.tenant_key() for t in outcome.placement.tenants]  # two tenants of one model
        assert keys == [
            "efficientnet-lite0" if "version" not in t else f"efficientnet-lite0@{t['version']}"
            for t in tenants
        ]
    else:
        assert isinstance(outcome, Refused) and outcome.generation == 4
        assert refusal in outcome.reason and "one tenant per model and version" in outcome.reason


def test_an_unpinned_tenant_beside_the_newest_version_pinned_is_refused():
    """Unpinned serves the newest installed (1.0.0, the bundled one): pinning it too is the same twice."""
    repo = ModelRepository(MODELS)
    same = Placement(tenants=[spec("efficientnet-lite0"), spec("efficientnet-lite0", version="1.0.0")])
    with pytest.raises(
        PlacementRefused, match=r"efficientnet-lite0 and efficientnet-lite0@1\.0\.0 would both"
    ):
        check_runnable(same, repo)


def test_plan_keys_a_pinned_tenant_beside_another_version_by_name_at_version():
    """Adding a second version starts only it: the tenant already serving is kept, not restarted.
    A lone tenant keeps the model's name as its key whatever its version, so switching its version
    is a change of that tenant (a version that fails to load leaves the old one serving)."""
    running = {"m": spec("m")}
    steps = plan(Placement(tenants=[spec("m"), spec("m", version="2")]), running)
    assert steps.keep == ["m"] and [s.tenant_key() for s in steps.start] == ["m@2"]
    lone = Placement(tenants=[spec("m", version="2")])
    assert lone.tenants[0].tenant_key() == "m"
    steps = plan(lone, {"m": spec("m", version="1")})
    assert [s.tenant_key() for s in steps.start] == ["m"] and not steps.retire
    steps = plan(lone, {"m": spec("m"), "m@2": spec("m", version="2")})  # a staged switch completes
    assert [s.tenant_key() for s in steps.start] == ["m"] and steps.retire == ["m@2"]


@pytest.mark.parametrize(
    ("asked", "serving", "reaches"),
    [
        ("m", {"m": "1", "m@2": "2"}, "m"),  # the unpinned tenant is the default
        ("m", {"m@10": "10", "m@9": "9", "m@2": "2"}, "m@2"),  # else the oldest version placed (staged)
        ("m@2", {"m": "1", "m@2": "2"}, "m@2"),
        ("m@3", {"m": "3", "m@2": "2"}, "m"),  # the unpinned tenant serves 3: `m@3` reaches it
        ("m@4", {"m": "3", "m@2": "2"}, None),
        ("other", {"m": "1"}, None),
        ("m", {}, None),
    ],
)
def test_which_tenant_a_frame_reaches(asked, serving, reaches):
    assert resolve_key(asked, serving) == reaches


@pytest.mark.parametrize(
    ("asked", "version", "announced", "entities"),
    [
        ("m", "2", {"m", "m@1"}, "m"),  # the unpinned tenant answered
        ("m", "1", {"m@1", "m@2"}, "m@1"),  # `m` reached the oldest pinned one
        ("m@1", "1", {"m", "m@1"}, "m@1"),
        ("m@2", "2", {"m", "m@1"}, "m"),  # the unpinned tenant serves 2
        ("m", "1", {"m"}, "m"),  # a lone pinned tenant keeps the name
    ],
)
def test_home_assistant_shows_an_answer_on_the_entities_of_the_tenant_that_served_it(
    asked, version, announced, entities
):
    ha = HomeAssistant(HomeAssistantConfig(), Topics("d"), TenantTable(), session=None)  # type: ignore[arg-type]
    ha.announced = {key: [] for key in announced}
    ref = TenantRef(backend="onnxruntime", device="cpu", instance=0)
    timing = Timing(queue=0, preprocess=0, infer=0, total=0)
    top = [TopK(index=1, label="cat", score=0.9)]
    ha.observe(
        None, InferResult(request_id="r", model=asked, tenant=ref, version=version, top=top, timing_ms=timing)
    )
    assert list(ha.last_top) == [entities]
