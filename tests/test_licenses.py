"""License normalisation table and the commercial/research policies."""

import pytest

from aplantida_jax.data import licenses

NORMALISATION = [
  # CC spelled every which way
  ("CC BY-SA 4.0", "CC-BY-SA-4.0"),
  ("CC-BY-SA-4.0", "CC-BY-SA-4.0"),
  ("cc-by-nc", "CC-BY-NC-4.0"),  # iNaturalist code, no version → 4.0
  ("cc-by-nc-nd", "CC-BY-NC-ND-4.0"),
  ("CC BY-NC-SA 2.0", "CC-BY-NC-SA-2.0"),
  ("CC BY 2.5", "CC-BY-2.5"),
  ("by-sa", "CC-BY-SA-4.0"),
  ("Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International", "CC-BY-NC-SA-4.0"),
  ("Attribution Non-Commercial 3.0", "CC-BY-NC-3.0"),
  ("Attribution-NoDerivs 3.0", "CC-BY-ND-3.0"),
  ("https://creativecommons.org/licenses/by/4.0/", "CC-BY-4.0"),
  ("http://creativecommons.org/licenses/by-sa/3.0/deed.es", "CC-BY-SA-3.0"),
  ("https://creativecommons.org/licenses/by-nc-nd/3.0/es/", "CC-BY-NC-ND-3.0"),  # port → unported
  ("https://creativecommons.org/licenses/by/2/", "CC-BY-2.0"),
  # CC0 and public domain
  ("CC0", "CC0-1.0"),
  ("cc0 1.0", "CC0-1.0"),
  ("CC-0", "CC0-1.0"),
  ("https://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
  ("Public Domain", "LicenseRef-PublicDomain"),
  ("public domain (author died 1900)", "LicenseRef-PublicDomain"),
  ("https://creativecommons.org/publicdomain/mark/1.0/", "CC-PDM-1.0"),  # SPDX's id for the mark
  ("Public Domain Mark 1.0", "CC-PDM-1.0"),
  ("PD", "LicenseRef-PublicDomain"),
  # nothing granted
  ("All rights reserved", "LicenseRef-All-Rights-Reserved"),
  ("(c) Ana García", "LicenseRef-All-Rights-Reserved"),
  ("© 2021", "LicenseRef-All-Rights-Reserved"),
  ("Copyright 2019 John", "LicenseRef-All-Rights-Reserved"),
  ("Photo (c) John Smith, all rights reserved", "LicenseRef-All-Rights-Reserved"),
  # a copyright notice that names a license grants it
  ("(c) John, CC BY 4.0", "CC-BY-4.0"),
  ("© Ana García - CC BY-SA 3.0", "CC-BY-SA-3.0"),
  ("Some rights reserved (CC BY-NC)", "CC-BY-NC-4.0"),
  # negations and exceptions are not the license they mention
  ("CC BY 4.0 except commercial use", "unknown"),
  ("Not CC BY", "unknown"),
  ("CC BY-SA, excluding derivatives", "unknown"),
  # SPDX expressions keep their structure, each member normalised
  ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", "CC-BY-NC-4.0 OR CC-BY-SA-4.0"),
  ("GFDL-1.2-or-later OR CC-BY-SA-3.0", "GFDL-1.2-or-later OR CC-BY-SA-3.0"),
  ("CC-BY-SA-4.0 AND CC-BY-NC-4.0", "CC-BY-SA-4.0 AND CC-BY-NC-4.0"),
  ("cc by 4.0 or cc by-sa 4.0", "CC-BY-4.0 OR CC-BY-SA-4.0"),
  ("(MIT OR CC0) AND CC-BY-4.0", "(MIT OR CC0-1.0) AND CC-BY-4.0"),
  # "and"/"or" in free text is not an expression unless every member is a license
  ("Photo by John and Mary, CC BY 4.0", "CC-BY-4.0"),
  # nothing said, or nonsense
  ("", "unknown"),
  ("   ", "unknown"),
  (None, "unknown"),
  ("unknown", "unknown"),
  ("N/A", "unknown"),
  ("photo by John", "unknown"),
  ("cc-by-sa-nd", "unknown"),  # SA and ND cannot be combined
  ("https://example.org/my-license", "unknown"),
  # software licenses (weights)
  ("Apache Software License", "Apache-2.0"),
  ("apache-2.0", "Apache-2.0"),
  ("MIT License", "MIT"),
  ("BSD-3-Clause", "BSD-3-Clause"),
]


@pytest.mark.parametrize("raw,spdx", NORMALISATION)
def test_normalize(raw, spdx):
  assert licenses.normalize(raw) == spdx


@pytest.mark.parametrize("raw", [raw for raw, _ in NORMALISATION])
def test_normalize_is_idempotent(raw):
  spdx = licenses.normalize(raw)
  assert licenses.normalize(spdx) == spdx


COMMERCIAL = [
  ("CC0-1.0", True, "allowed"),
  ("LicenseRef-PublicDomain", True, "allowed"),
  ("CC-PDM-1.0", True, "allowed"),
  ("CC-BY-4.0", True, "allowed"),
  ("CC-BY-SA-3.0", True, "allowed"),
  ("CC-BY-NC-4.0", False, licenses.REASON_NC),
  ("CC-BY-NC-SA-4.0", False, licenses.REASON_NC),
  ("CC-BY-ND-4.0", False, licenses.REASON_ND),
  ("LicenseRef-All-Rights-Reserved", False, licenses.REASON_RESERVED),
  ("unknown", False, licenses.REASON_UNKNOWN),
  ("GFDL-1.3-or-later", False, licenses.REASON_NOT_LISTED),
  ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", True, "allowed"),  # one alternative passes
  ("CC-BY-SA-4.0 AND CC-BY-NC-4.0", False, licenses.REASON_NC),  # all must pass
  ("GFDL-1.3-or-later OR LicenseRef-All-Rights-Reserved", False, licenses.REASON_NOT_LISTED),
]


@pytest.mark.parametrize(
  "expression,policy,used",
  [
    # The one a user of the image may pick: the policy's best, then no credit owed, then CC-BY.
    ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", "commercial", "CC-BY-SA-4.0"),
    ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", "research", "CC-BY-SA-4.0"),
    ("GFDL-1.2-or-later OR CC-BY-SA-3.0", "commercial", "CC-BY-SA-3.0"),  # its own version
    ("CC-BY-SA-4.0 OR CC-BY-4.0 OR CC0-1.0", "commercial", "CC0-1.0"),
    ("CC-BY-SA-4.0 OR CC-BY-4.0", "commercial", "CC-BY-4.0"),
    ("CC-BY-ND-4.0 OR CC-BY-NC-4.0", "research", "CC-BY-ND-4.0"),  # equals: the order written
    ("(MIT OR CC0-1.0) AND CC-BY-4.0", "commercial", "CC0-1.0 AND CC-BY-4.0"),
    ("CC-BY-SA-4.0 AND CC-BY-NC-4.0", "research", "CC-BY-SA-4.0 AND CC-BY-NC-4.0"),
    ("CC-BY-4.0", "commercial", "CC-BY-4.0"),
  ],
)
def test_choose_names_the_alternative_the_policy_uses(expression, policy, used):
  chosen, allowed, _ = licenses.get_policy(policy).choose(expression)
  assert (chosen, allowed) == (used, True)
  assert licenses.normalize(chosen) == chosen


@pytest.mark.parametrize("spdx,allowed,reason", COMMERCIAL)
def test_commercial_policy(spdx, allowed, reason):
  policy = licenses.get_policy("commercial")
  assert policy.shippable
  assert policy.check(spdx) == (allowed, reason)


@pytest.mark.parametrize("spdx,commercial_ok,_", COMMERCIAL)
def test_research_policy_admits_nc_nd_unknown_only(spdx, commercial_ok, _):
  research = licenses.get_policy("research")
  assert not research.shippable
  allowed, reason = research.check(spdx)
  _, commercial_reason = licenses.get_policy("commercial").check(spdx)
  tolerated = commercial_reason in (licenses.REASON_NC, licenses.REASON_ND, licenses.REASON_UNKNOWN)
  assert allowed == (commercial_ok or tolerated)
  if tolerated:
    assert reason.startswith("research use only") and commercial_reason in reason
  if not allowed:
    assert reason  # every rejection says why


def test_unknown_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="commercial.*research"):
    licenses.get_policy("comercial")


@pytest.mark.parametrize(
  "spdx,needs",
  [
    ("CC-BY-4.0", True),
    ("CC-BY-SA-4.0", True),
    ("CC-BY-NC-4.0", True),
    ("CC0-1.0", False),
    ("LicenseRef-PublicDomain", False),
    ("CC-PDM-1.0", False),
    ("unknown", True),
    ("CC0-1.0 AND CC-BY-4.0", True),  # any member that needs credit
  ],
)
def test_requires_attribution(spdx, needs):
  assert licenses.requires_attribution(spdx) == needs


@pytest.mark.parametrize(
  "text,ok",
  [
    ("Apache-2.0", True),
    ("Apache Software License", True),
    ("MIT", True),
    ("BSD-3-Clause", True),
    ("BSD-2-Clause", True),
    ("CC0-1.0", True),
    ("CC-BY-4.0", False),
    ("CC-BY-NC-4.0", False),
    ("GPL-3.0", False),
    ("", False),
    (None, False),
  ],
)
def test_weights_license_allowed(text, ok):
  assert licenses.weights_license_allowed(text) == ok


def test_unrecognised_strings_are_flagged_but_blank_ones_are_not():
  assert licenses.unrecognised("see website")
  assert not licenses.unrecognised("")
  assert not licenses.unrecognised("unknown")
  assert not licenses.unrecognised("CC BY 4.0")
