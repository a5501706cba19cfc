"""License strings → SPDX ids, and the policies that decide which images we may use.

Catalogs write licenses every which way ("CC BY-SA 4.0", "cc-by-nc", creative
commons URLs, "Public Domain", ""). Decisions must not depend on spelling, so
everything is first normalised to one SPDX id, then judged by a named policy:

  commercial  (default, shippable) CC0-1.0, public domain, CC-BY-*, CC-BY-SA-*.
  research    (not shippable)      also NC, ND and unknown; for experiments only.

Conventions (documented in README):
  * SPDX expressions ("CC-BY-NC-4.0 OR CC-BY-SA-4.0", "A AND B", parsed by the
    `license-expression` library) keep their structure, each member normalised:
    `OR` lets the user pick, so a policy admits it when one alternative passes and
    `Policy.choose` names the most permissive one it admits; `AND` needs all.
  * The Public Domain Mark (".../publicdomain/mark/1.0/", "PDM") is SPDX's
    `CC-PDM-1.0`; other public-domain statements ("Public Domain", "PD") have no
    SPDX id: `LicenseRef-PublicDomain` (SPDX's syntax for unlisted licenses).
  * "All rights reserved" anywhere, or a copyright notice ("(c)", "©",
    "copyright") that names no license → `LicenseRef-All-Rights-Reserved`;
    "(c) Ana, CC BY 4.0" is the CC license it names.
  * A negation or exception ("not", "except", "excluding", "without") makes the
    text unreadable → "unknown": "CC BY 4.0 except commercial use" is not CC-BY.
  * A CC license without version ("cc-by-nc", iNaturalist codes) is read as 4.0,
    the current version; jurisdiction ports (".../by/3.0/es/") map to the
    unported id, which has the same terms. The raw string is kept on the record.
  * Anything empty or unrecognised → "unknown".
"""

import dataclasses
import functools
import re

import license_expression

UNKNOWN = "unknown"
PUBLIC_DOMAIN = "LicenseRef-PublicDomain"
PUBLIC_DOMAIN_MARK = "CC-PDM-1.0"
ALL_RIGHTS_RESERVED = "LicenseRef-All-Rights-Reserved"
CC0 = "CC0-1.0"

_CC_VERSIONS = ("1.0", "2.0", "2.5", "3.0", "4.0")
_CC_DEFAULT_VERSION = "4.0"
# Non-CC ids we recognise (lower-cased spelling variants → SPDX id); weights use these.
_OTHER_SPELLINGS = {
  "mit license": "MIT",
  "apache 2.0": "Apache-2.0",
  "apache2": "Apache-2.0",
  "apache license 2.0": "Apache-2.0",
  "apache license, version 2.0": "Apache-2.0",
  "apache software license": "Apache-2.0",
  "bsd 2-clause": "BSD-2-Clause",
  "bsd 3-clause": "BSD-3-Clause",
  "bsd license": "BSD-3-Clause",
  "gfdl": "GFDL-1.3-or-later",
  "gfdl-1.2": "GFDL-1.2-or-later",
  "gfdl-1.3": "GFDL-1.3-or-later",
  "public domain": PUBLIC_DOMAIN,
  "publicdomain": PUBLIC_DOMAIN,
  "pd": PUBLIC_DOMAIN,
  "pdm": PUBLIC_DOMAIN_MARK,
  "pdm-1.0": PUBLIC_DOMAIN_MARK,
  "cc-pdm-1.0": PUBLIC_DOMAIN_MARK,
  "cc pdm": PUBLIC_DOMAIN_MARK,
  "public domain mark": PUBLIC_DOMAIN_MARK,
  "public domain mark 1.0": PUBLIC_DOMAIN_MARK,
  "no known copyright restrictions": PUBLIC_DOMAIN,
  "all rights reserved": ALL_RIGHTS_RESERVED,
  "all-rights-reserved": ALL_RIGHTS_RESERVED,
  "arr": ALL_RIGHTS_RESERVED,
  "proprietary": ALL_RIGHTS_RESERVED,
}
# Ids we emit map to themselves, so normalize() is idempotent.
_KNOWN = {
  **{v.lower(): v for v in _OTHER_SPELLINGS.values()},
  **{v.lower(): v for v in ("MIT", "Apache-2.0", "PDDL-1.0", CC0)},
  **_OTHER_SPELLINGS,
}
_COPYRIGHT_PREFIXES = ("copyright", "(c)", "©")
_NEGATION = re.compile(r"\b(not|except|excluding|without)\b")
_OPERATOR = re.compile(r"\b(or|and|with)\b")
_PUBLIC_DOMAIN_FREE = (CC0, PUBLIC_DOMAIN, PUBLIC_DOMAIN_MARK, "PDDL-1.0")  # no credit owed
_UNKNOWN_WORDS = ("unknown", "none", "n/a", "na", "null", "not specified", "unspecified", "-", "?")
_CC_URL = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z\-+]+)(?:/(\d(?:\.\d)?))?")


def normalize(raw) -> str:
  """License text (or None) → SPDX id, `LicenseRef-*`, an SPDX expression of those, or "unknown".

  Idempotent: what it returns normalises to itself.
  """
  if raw is None:
    return UNKNOWN
  text = " ".join(str(raw).strip().split())
  expression = _expression(text) if _OPERATOR.search(text.lower()) else None
  return expression or _normalize_text(text.lower())


def _expression(text: str) -> str | None:
  """ "A OR (B AND C)" with every member normalised; None unless it parses and every member reads."""
  try:
    parsed = _LICENSING.parse(text)
  except license_expression.ExpressionError:
    return None

  def render(node, top):
    if isinstance(node, license_expression.LicenseSymbol):
      spdx = _normalize_text(" ".join(node.key.lower().split()))
      return None if spdx == UNKNOWN else spdx
    if not isinstance(node, (_LICENSING.OR, _LICENSING.AND)):
      return None  # "X WITH exception": not used for images
    members = [render(arg, False) for arg in node.args]
    if None in members:
      return None
    joined = f" {node.operator.strip()} ".join(members)
    return joined if top else f"({joined})"

  rendered = render(parsed, True)
  return rendered if rendered and _OPERATOR.search(rendered.lower()) else None


_LICENSING = license_expression.Licensing()


def _normalize_text(text: str) -> str:
  """One license in free-form lower-case text → SPDX id, `LicenseRef-*`, or "unknown"."""
  text = re.sub(r"\bcc[ _-]?(?:0|zero)\b", "cc0", text)
  if not text or text in _UNKNOWN_WORDS:
    return UNKNOWN
  if text in _KNOWN:
    return _KNOWN[text]
  if _NEGATION.search(text):
    return UNKNOWN
  if "all rights reserved" in text and "some rights reserved" not in text:
    return ALL_RIGHTS_RESERVED
  if "creativecommons.org" in text:
    return _from_cc_url(text)
  if text.startswith("public domain mark"):
    return PUBLIC_DOMAIN_MARK
  if text.startswith("public domain"):
    return PUBLIC_DOMAIN
  if text.startswith(_COPYRIGHT_PREFIXES):
    named = _from_cc_text(text)  # "(c) Ana, CC BY 4.0": the license it names
    return ALL_RIGHTS_RESERVED if named == UNKNOWN else named
  return _from_cc_text(text)


@functools.lru_cache(maxsize=4096)
def _tree(spdx: str):
  """A normalised license → an id, or ("OR" | "AND", [members])."""
  if not _OPERATOR.search(spdx.lower()):
    return spdx

  def walk(node):
    if isinstance(node, license_expression.LicenseSymbol):
      return node.key
    return node.operator.strip(), [walk(arg) for arg in node.args]

  return walk(_LICENSING.parse(spdx))


def members(spdx: str) -> list:
  """Every license id in a normalised license or expression, in order."""

  def walk(node):
    return [node] if isinstance(node, str) else [m for child in node[1] for m in walk(child)]

  return walk(_tree(spdx))


def _render(node, top=False) -> str:
  if isinstance(node, str):
    return node
  joined = f" {node[0]} ".join(_render(child) for child in node[1])
  return joined if top else f"({joined})"


def unrecognised(raw) -> bool:
  """True when `raw` says something we cannot read (it normalises to unknown but is not "unknown")."""
  text = " ".join(str(raw or "").strip().lower().split())
  return bool(text) and text not in _UNKNOWN_WORDS and normalize(raw) == UNKNOWN


def _cc_id(terms, version: str | None) -> str:
  """{'by','nc','sa','nd'} + version → 'CC-BY-NC-SA-4.0'; "unknown" for impossible sets."""
  if "by" not in terms or ("sa" in terms and "nd" in terms):
    return UNKNOWN
  version = version if version in _CC_VERSIONS else _CC_DEFAULT_VERSION
  parts = ["CC", "BY"] + [t.upper() for t in ("nc", "sa", "nd") if t in terms]
  return "-".join(parts + [version])


def _from_cc_url(text: str) -> str:
  match = _CC_URL.search(text)
  if not match:
    return UNKNOWN
  kind, code, version = match.groups()
  if kind == "publicdomain":
    return CC0 if code == "zero" else PUBLIC_DOMAIN_MARK if code == "mark" else UNKNOWN
  version = version + ".0" if version and "." not in version else version
  return _cc_id(set(code.split("-")), version)


def _from_cc_text(text: str) -> str:
  """'CC BY-SA 4.0', 'cc-by-nc', 'CC-BY-NC-SA-3.0', 'cc0', 'Attribution 4.0 International' → id."""
  tokens = re.findall(r"cc0|zero|\d\.\d|\d|[a-z]+", text)
  if "cc0" in tokens or ("cc" in tokens and "zero" in tokens):
    return CC0
  words = {
    "attribution": "by",
    "noncommercial": "nc",
    "sharealike": "sa",
    "noderivatives": "nd",
    "noderivs": "nd",
    "non commercial": "nc",
    "share alike": "sa",
    "no derivatives": "nd",
    "no derivs": "nd",
  }
  pairs = [" ".join(tokens[i : i + 2]) for i in range(len(tokens))]
  terms = {t for t in tokens if t in ("by", "nc", "sa", "nd")}
  terms |= {words[w] for w in tokens + pairs if w in words}
  bare_clauses = all(t in ("by", "nc", "sa", "nd") or t[0].isdigit() for t in tokens)  # "by-sa 4.0"
  is_cc = bare_clauses or "cc" in tokens or "creative" in tokens or "attribution" in tokens
  if not is_cc or not terms:
    return UNKNOWN
  versions = [t if "." in t else t + ".0" for t in tokens if t[0].isdigit()]
  return _cc_id(terms, versions[0] if versions else None)


def _clauses(spdx: str) -> set:
  """CC clauses of an id ('CC-BY-NC-SA-4.0' → {'BY','NC','SA'}); empty for non-CC ids."""
  if not spdx.startswith("CC-BY"):
    return set()
  return set(spdx.split("-")[1:-1])


def requires_attribution(spdx: str) -> bool:
  """Whether using the image obliges us to credit its author (all but CC0/public domain).

  For an expression: whether any member does (an `OR` should be `Policy.choose`n first).
  """
  return any(m not in _PUBLIC_DOMAIN_FREE for m in members(spdx))


# Reasons are stable category strings: the audit report groups rejections by them.
REASON_UNKNOWN = "unknown license: no usable license recorded"
REASON_RESERVED = "all rights reserved: no license grant"
REASON_NC = "non-commercial (NC) clause forbids commercial use"
REASON_ND = "no-derivatives (ND) clause forbids derived works"
REASON_NOT_LISTED = "license not on the policy's allow-list"


def _commercial_problem(spdx: str) -> str | None:
  """Why `spdx` is not commercial-safe, or None when it is."""
  if spdx in _PUBLIC_DOMAIN_FREE[:3]:
    return None
  clauses = _clauses(spdx)
  if "NC" in clauses:
    return REASON_NC
  if "ND" in clauses:
    return REASON_ND
  if clauses:  # BY or BY-SA
    return None
  if spdx == UNKNOWN:
    return REASON_UNKNOWN
  if spdx == ALL_RIGHTS_RESERVED:
    return REASON_RESERVED
  return REASON_NOT_LISTED


@dataclasses.dataclass(frozen=True)
class Policy:
  """A named image-license policy. `shippable` is False for models trained under it."""

  name: str
  shippable: bool
  research_reasons: tuple = ()  # problems this policy tolerates (research use only)

  def check(self, spdx: str) -> tuple:
    """→ (allowed, reason). Reason says why it was rejected, or on what terms it is in."""
    return self.choose(spdx)[1:]

  def choose(self, spdx: str) -> tuple:
    """→ (license used, allowed, reason) for a normalised license or expression.

    `A OR B`: the alternative this policy ranks best (allowed outright, then research
    only, then rejected; among equals the one that owes no credit, then CC-BY before
    CC-BY-SA, then the order written). `A AND B`: all of it, judged by its worst member.
    """
    chosen, allowed, reason = self._choose(_tree(spdx))
    return _render(chosen, top=True), allowed, reason

  def _choose(self, node) -> tuple:
    if isinstance(node, str):
      return (node, *self._judge(node))
    operator, children = node
    options = [self._choose(child) for child in children]
    if operator == "OR":
      return min(
        options,
        key=lambda o: (self._rank(o), _credit_rank(_render(o[0], top=True)), options.index(o)),
      )
    worst = max(options, key=self._rank)
    return (operator, [o[0] for o in options]), worst[1], worst[2]

  def _judge(self, spdx: str) -> tuple:
    problem = _commercial_problem(spdx)
    if problem is None:
      return True, "allowed"
    if problem in self.research_reasons:
      return True, f"research use only: {problem}"
    return False, problem

  @staticmethod
  def _rank(option) -> int:
    _, allowed, reason = option
    return 0 if reason == "allowed" else 1 if allowed else 2


def _credit_rank(spdx: str) -> int:
  """Among equally admitted alternatives: no credit owed, then CC-BY, then CC-BY-SA."""
  if not requires_attribution(spdx):
    return 0
  return 1 if _clauses(spdx) == {"BY"} else 2 if _clauses(spdx) == {"BY", "SA"} else 3


POLICIES = {
  "commercial": Policy("commercial", shippable=True),
  "research": Policy(
    "research", shippable=False, research_reasons=(REASON_NC, REASON_ND, REASON_UNKNOWN)
  ),
}


def get_policy(name: str) -> Policy:
  """The policy called `name` (config `licenses.policy`); a ValueError lists the choices."""
  if name not in POLICIES:
    raise ValueError(
      f"Unknown license policy {name!r} in licenses.policy; choose one of {sorted(POLICIES)}."
    )
  return POLICIES[name]


WEIGHT_LICENSES = ("Apache-2.0", "MIT", CC0)  # plus any BSD-*


def weights_license_allowed(license_text) -> bool:
  """Whether model weights under this license may ship (Apache-2.0, MIT, BSD-*, CC0-1.0).

  Accepts free-form text too ("Apache Software License"): it is normalised first.
  """
  spdx = normalize(license_text)
  return spdx in WEIGHT_LICENSES or spdx.startswith("BSD-")
