"""The DSMB summary against numbers worked out by hand, and the digest email read back."""

from __future__ import annotations

import email
import email.policy
import json
import math
import re
import warnings
from datetime import UTC, date, datetime, timedelta

import pytest

from services.notify.digest_email import render_digest
from services.notify.incidence import CgvhdSeverity, clopper_pearson
from services.notify.summary import RuleSnapshot, Summary, build_summary
from shared.clinical.records import INCIDENCE_NAMES, PatientOutcome

Z = 1.959963984540054
BLINA, USUAL = "blinatumomab_dli", "usual_care"
B0, U0 = date(2023, 1, 2), date(2024, 6, 3)  # survival origins of the two arms
CUTOFF = datetime(2026, 11, 23, tzinfo=UTC)
GENERATED = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def day(origin: date, n: int | None) -> date | None:
    return None if n is None else origin + timedelta(days=n)


def patient(sid: str, arm: str, *, last: int, death: int | None = None, relapse: int | None = None,
            dli: int | None = None, agvhd: int | None = None, cause: str | None = None,
            crs3: bool | None = None, site: str = "site-1", cgvhd: str | None = None) -> PatientOutcome:
    origin = B0 if arm == BLINA else U0
    endpoints: dict[str, bool | None] = {name: None for name in INCIDENCE_NAMES}
    if arm == BLINA:
        endpoints |= {"crs_any_2w": True, "icans_any_2w": False, "crs_grade_3_plus_2w": crs3}
    return PatientOutcome(
        subject_id=sid, site_id=site, arm=arm,
        cohort="mrd_positive" if sid.endswith(("1", "2", "3")) else "hematologic_relapse",
        enrolled_at=datetime.combine(origin, datetime.min.time(), UTC),
        origin=origin, last_contact=day(origin, last), death_date=day(origin, death),
        death_cause=cause, relapse_date=day(origin, relapse), courses=1 if arm == BLINA else 0,
        doses=10 if arm == BLINA else 0, dlis=1 if dli is not None else 0, dli_date=day(origin, dli),
        agvhd_onset=day(origin, agvhd), cgvhd_severity=cgvhd, endpoints=endpoints,
    )


# Days from the origin. The DLI days are chosen so that, counted from the DLI, aGVHD and the
# competing death fall as: B4 aGVHD 20; B2 aGVHD 60, B1 death 60, B3 censored 60; B5 aGVHD 150;
# B6 censored 200.
COHORT = (
    patient("B-01", BLINA, last=100, death=100, dli=40, cause="infection", crs3=True),
    patient("B-02", BLINA, last=400, death=400, relapse=200, dli=50, agvhd=110, cause="relapse",
            crs3=False, cgvhd="mild"),
    patient("B-03", BLINA, last=300, relapse=150, dli=240, crs3=False),
    patient("B-04", BLINA, last=1200, dli=40, agvhd=60, crs3=True, site="site-2", cgvhd="severe"),
    patient("B-05", BLINA, last=600, death=600, dli=100, agvhd=250, cause="gvhd", crs3=False,
            cgvhd="moderate"),
    patient("B-06", BLINA, last=1300, dli=1100, site="site-2", cgvhd="moderate"),
    patient("U-01", USUAL, last=50, death=50, cause="relapse"),
    patient("U-02", USUAL, last=120),
    patient("U-03", USUAL, last=400, relapse=80),
    patient("U-04", USUAL, last=300, death=300, cause="relapse"),
)
RULES = (
    RuleSnapshot("crs_grade_3_plus", "Grade >= 3 CRS within the 2-week window", 5, 2, 3, False,
                 ((1, None), (2, 2), (3, 2), (4, 3), (5, 3), (6, 3))),
    RuleSnapshot("nrm_100d", "Death not caused by relapse within 100 days of DLI", 3, 3, 2, True,
                 ((1, None), (2, 2), (3, 2)), crossed_at_look=2, events_at_crossing=2, path=(1, 2, 3)),
)


@pytest.fixture(scope="module")
def summary() -> Summary:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build_summary(COHORT, RULES, generated_at=GENERATED, data_cutoff=CUTOFF,
                              trial_title="Blinatumomab + DLI")
    assert not [w for w in caught if "tied" in str(w.message).lower()], "lifelines jittered ties"
    return built


def row(rows, **match):
    [found] = [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]
    return found


def loglog_ci(s: float, greenwood_sum: float) -> tuple[float, float]:
    se = math.sqrt(greenwood_sum) / abs(math.log(s))
    return s ** math.exp(Z * se), s ** math.exp(-Z * se)


# --- incidences --------------------------------------------------------------------------------


def test_clopper_pearson_matches_published_values():
    low, high = clopper_pearson(2, 10)
    assert (round(low, 4), round(high, 4)) == (0.0252, 0.5561)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(0.3085, abs=1e-4))
    assert clopper_pearson(10, 10) == (pytest.approx(0.6915, abs=1e-4), 1.0)


def test_incidences_count_only_evaluable_patients(summary):
    crs3 = row(summary.incidences, name="crs_grade_3_plus_2w", arm=BLINA)
    # B-06 is not evaluable (None): 2 events among 5.
    assert (crs3.events, crs3.evaluable, crs3.rate) == (2, 5, 0.4)
    assert (crs3.ci_low, crs3.ci_high) == pytest.approx((0.0527, 0.8534), abs=1e-4)
    assert row(summary.incidences, name="crs_any_2w", arm=BLINA).ci_high == 1.0
    assert row(summary.incidences, name="icans_any_2w", arm=BLINA).ci_low == 0.0
    nothing = row(summary.incidences, name="crs_grade_3_plus_2w", arm=USUAL)
    assert (nothing.evaluable, nothing.rate, nothing.ci_low, nothing.ci_high) == (0, None, None, None)
    assert len(summary.incidences) == len(INCIDENCE_NAMES) * 2


# --- Kaplan-Meier ------------------------------------------------------------------------------


def test_overall_survival_is_the_product_limit_estimate(summary):
    # Blinatumomab OS: deaths at 100 (6 at risk), 400 (4 at risk: B-03 censored at 300), 600 (3).
    s = (1 - 1 / 6) * (1 - 1 / 4) * (1 - 1 / 3)
    greenwood = 1 / (6 * 5) + 1 / (4 * 3) + 1 / (3 * 2)
    os = row(summary.survival, endpoint="os", arm=BLINA)
    assert (os.n, os.events, os.median_days) == (6, 3, 600)
    assert os.at_3y == pytest.approx(s)
    assert (os.ci_low, os.ci_high) == pytest.approx(loglog_ci(s, greenwood))


def test_disease_free_survival_counts_relapse_or_death_whichever_first(summary):
    # Events at 100 (death), 150 (relapse), 200 (relapse; B-02's death at 400 comes later), 600.
    s = (1 - 1 / 6) * (1 - 1 / 5) * (1 - 1 / 4) * (1 - 1 / 3)
    greenwood = 1 / (6 * 5) + 1 / (5 * 4) + 1 / (4 * 3) + 1 / (3 * 2)
    dfs = row(summary.survival, endpoint="dfs", arm=BLINA)
    assert dfs.events == 4
    # S = 0.5 exactly from day 200 until the next event on day 600: R's midpoint rule gives 400.
    assert dfs.median_days == 400
    assert dfs.at_3y == pytest.approx(s)
    assert (dfs.ci_low, dfs.ci_high) == pytest.approx(loglog_ci(s, greenwood))


def test_three_year_estimate_is_null_when_follow_up_is_shorter(summary):
    os = row(summary.survival, endpoint="os", arm=USUAL)
    # Usual care: death at 50 (4 at risk), censored 120, death at 300 (2 at risk), censored 400.
    assert os.median_days == 300  # (1 - 1/4) * (1 - 1/2) = 0.375
    assert (os.at_3y, os.ci_low, os.ci_high) == (None, None, None)
    assert summary.survival_curves["os"][1].values[-1] == pytest.approx((1 - 1 / 4) * (1 - 1 / 2))
    # Usual-care DFS: 0.5 = (1 - 1/4) * (1 - 1/3) from day 80 (U-03's relapse) to day 300.
    assert row(summary.survival, endpoint="dfs", arm=USUAL).median_days == (80 + 300) / 2


def test_three_year_estimate_is_0_when_everyone_had_the_event_before_it():
    cohort = [patient("B-01", BLINA, last=3, death=3, cause="crs"),
              patient("B-02", BLINA, last=400, death=400, cause="relapse")]
    os = row(build_summary(cohort, RULES, generated_at=GENERATED, data_cutoff=CUTOFF, trial_title="t").survival,
             endpoint="os", arm=BLINA)
    assert (os.at_3y, os.ci_low, os.ci_high) == (0.0, None, None)
    assert os.median_days == (3 + 400) / 2  # S = 0.5 from day 3 to 400: the midpoint (quantile.survfit)


def test_log_rank_compares_the_arms_per_endpoint(summary):
    assert [r.endpoint for r in summary.logrank] == ["os", "dfs"]
    assert all(0 <= r.p_value <= 1 for r in summary.logrank)


# --- Aalen-Johansen ----------------------------------------------------------------------------


def test_agvhd_cumulative_incidence_treats_death_as_competing(summary):
    # From the DLI: aGVHD at 20 (6 at risk); at 60 one aGVHD and one competing death among 5 at
    # risk (the censoring on day 60 comes after both); aGVHD at 150 (2 at risk).
    f20 = 1 / 6
    survival_before_60 = 1 - 1 / 6
    f60 = f20 + survival_before_60 * 1 / 5
    [agvhd] = summary.agvhd  # usual care has no DLI and is left out
    assert (agvhd.arm, agvhd.n, agvhd.events, agvhd.competing) == (BLINA, 6, 3, 1)
    assert agvhd.at_100d == pytest.approx(f60) == pytest.approx(1 / 3)
    assert agvhd.ci_low < agvhd.at_100d < agvhd.ci_high
    survival_after_60 = survival_before_60 * (1 - 2 / 5)
    assert summary.agvhd_curves[0].values[-1] == pytest.approx(f60 + survival_after_60 * 1 / 2)


# --- enrolment and json ------------------------------------------------------------------------


def test_chronic_gvhd_counts_each_patient_once_by_the_worst_nih_severity(summary):
    assert row(summary.cgvhd_severity, arm=BLINA) == CgvhdSeverity(BLINA, patients=6, none=2, mild=1,
                                                                   moderate=2, severe=1)
    assert row(summary.cgvhd_severity, arm=USUAL) == CgvhdSeverity(USUAL, 4, 4, 0, 0, 0)
    assert summary.to_json()["cgvhd_severity"][0] == {"arm": BLINA, "patients": 6, "none": 2, "mild": 1,
                                                      "moderate": 2, "severe": 1}


def test_enrolment_and_exposure(summary):
    assert summary.enrolled == {BLINA: 6, USUAL: 4}
    assert summary.enrolled_by_site == {"site-1": {BLINA: 4, USUAL: 4}, "site-2": {BLINA: 2, USUAL: 0}}
    total = summary.exposure[-1]
    assert (total.arm, total.courses, total.doses, total.dlis) == ("all", 6, 60, 6)


def test_empty_trial_gives_a_summary_valid_json_and_an_email():
    empty = build_summary([], RULES, generated_at=GENERATED, data_cutoff=CUTOFF, trial_title="t")
    assert empty.enrolled == {BLINA: 0, USUAL: 0}
    assert json.loads(json.dumps(empty.to_json(), allow_nan=False))["survival"] == []
    msg = render_digest(empty, mail_from="a@x.invalid", recipients=["d@x.invalid"], message_id="<m@x>")
    assert "(no patients yet)" in msg.get_body(preferencelist=("plain",)).get_content()
    assert len([p for p in msg.walk() if p.get_content_type() == "image/png"]) == 5


def test_median_of_a_curve_flat_at_one_half_until_the_last_follow_up():
    # Death at 10 among 2, the other censored at 30: S = 0.5 from 10 to the end -> (10 + 30) / 2.
    pair = [patient("B-11", BLINA, last=10, death=10), patient("B-12", BLINA, last=30)]
    both = build_summary(pair, [], generated_at=GENERATED, data_cutoff=CUTOFF, trial_title="t")
    assert row(both.survival, endpoint="os", arm=BLINA).median_days == 20


def test_single_arm_renders_without_log_rank():
    only = build_summary(COHORT[:6], RULES, generated_at=GENERATED, data_cutoff=CUTOFF, trial_title="t")
    assert only.logrank == ()
    render_digest(only, mail_from="a@x.invalid", recipients=["d@x.invalid"], message_id="<m@x.invalid>")


# --- the email ---------------------------------------------------------------------------------

CONTRACT_KEYS = {"generated_at", "data_cutoff", "enrolled", "incidences", "survival", "stopping_rules"}
ADDED_KEYS = {"trial_title", "cgvhd_severity", "enrolled_by_cohort", "enrolled_by_site", "exposure", "logrank",
              "agvhd_cumulative_incidence", "deaths"}


@pytest.fixture(scope="module")
def parsed(summary):
    msg = render_digest(summary, mail_from="trialwatch@x.invalid",
                        recipients=["dsmb1@x.invalid", "dsmb2@x.invalid"], message_id="<d1@x.invalid>")
    return email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)


def test_email_headers(parsed):
    assert parsed["Subject"] == "[TrialWatch] DSMB safety summary — data as of 2026-11-23"
    assert parsed["To"] == "dsmb1@x.invalid, dsmb2@x.invalid"
    assert parsed["Message-ID"] == "<d1@x.invalid>"


def test_html_images_are_inline_parts(parsed):
    html = parsed.get_body(preferencelist=("html",)).get_content()
    cids = set(re.findall(r'src="cid:([^"]+)"', html))
    images = {p["Content-ID"].strip("<>"): p for p in parsed.walk() if p.get_content_type() == "image/png"}
    assert cids and cids == set(images)  # 2 KM + aGVHD + 2 rules
    assert len(cids) == 5
    assert all(p.get_content().startswith(b"\x89PNG") for p in images.values())


def test_summary_json_attachment_has_the_contract_keys(parsed, summary):
    [attachment] = [p for p in parsed.iter_attachments() if p.get_filename() == "summary.json"]
    assert attachment.get_content_type() == "application/json"
    document = json.loads(attachment.get_content())
    assert set(document) == CONTRACT_KEYS | ADDED_KEYS
    assert document == json.loads(json.dumps(summary.to_json()))
    assert set(document["stopping_rules"][0]) >= {"rule_id", "evaluable", "events", "stop_at", "crossed"}
    # A crossing stays crossed; when it happened is said beside it.
    nrm = next(r for r in document["stopping_rules"] if r["rule_id"] == "nrm_100d")
    assert (nrm["crossed"], nrm["crossed_at_look"], nrm["events_at_crossing"]) == (True, 2, 2)


def test_text_part_holds_every_figure_as_a_table(parsed):
    text = parsed.get_body(preferencelist=("plain",)).get_content()
    assert "Data as of: 2026-11-23" in text and "Date of report: 2026-11-23" in text
    assert re.search(r"CRS, grade >= 3 \(2 weeks\)\s+Blinatumomab \+ DLI\s+2 / 5\s+40\.0%\s+5\.3.85\.3%", text)
    assert re.search(r"crs_grade_3_plus\s+2 / 5\s+3\s+not crossed", text)
    assert re.search(r"nrm_100d\s+3 / 3\s+2\s+CROSSED at 2 / 2", text)
    assert re.search(r"Overall survival\s+Blinatumomab \+ DLI\s+6\s+3\s+600\s+41\.7%", text)
    # Usual-care DFS reaches 0 at day 300 (its last patient at risk relapsed): 0% at 3 years, no interval.
    assert re.search(r"Disease-free survival\s+Usual care\s+4\s+3\s+190\s+0\.0%\s+—", text)
    assert re.search(r"Overall survival\s+Usual care\s+4\s+2\s+300\s+—\s+—", text)
    assert re.search(r"Blinatumomab \+ DLI\s+6\s+3\s+1\s+33\.3%", text)  # aGVHD at day 100
    assert re.search(r"B-01\s+Blinatumomab \+ DLI\s+site-1\s+100\s+infection", text)
    assert re.search(r"CHRONIC GVHD BY NIH 2014 GLOBAL SEVERITY.*\n.*\nBlinatumomab \+ DLI\s+6\s+2\s+1\s+2\s+1\n"
                     r"Usual care\s+4\s+4\s+0\s+0\s+0\n", text)


def test_html_is_escaped_and_text_is_not():
    hostile = build_summary(COHORT, RULES, generated_at=GENERATED, data_cutoff=CUTOFF,
                            trial_title="A <b>&</b> B")
    msg = render_digest(hostile, mail_from="a@x.invalid", recipients=["d@x.invalid"], message_id="<m@x>")
    assert "A &lt;b&gt;&amp;&lt;/b&gt; B" in msg.get_body(preferencelist=("html",)).get_content()
    assert "A <b>&</b> B" in msg.get_body(preferencelist=("plain",)).get_content()
