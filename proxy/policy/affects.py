"""Which search parameters read which encrypted elements.

Used on the request path (a parameter that reads an encrypted element is rewritten to
a blind index or refused) and by ``policy check`` (which explains the consequences of
a policy for search).
"""

from __future__ import annotations

from proxy.policy.compiler import CompiledElement, ResourcePolicy
from proxy.policy.searchparams import ParamPath, SearchParam, element_paths, search_params


def _key_matches(param_key: str, el_key: str, el: CompiledElement, last: bool) -> bool:
    if param_key == el_key:
        return True
    # the element is a choice (value[x]) and the parameter names one of its types
    return last and bool(el.choices) and param_key in {n for n, _ in el.choices}


def touches(path: ParamPath, el: CompiledElement) -> bool:
    """Whether the parameter reads the element or something inside or around it."""
    hops = (*el.nav, el.terminal)
    param_keys = path.json_path if path.choice_type else path.path
    closing = el.closing
    if closing is not None and closing.key == "url" and len(param_keys) < len(hops):
        return False  # unlisted extensions of what the parameter reads (subject.extension): not searched by it
    for i, (pk, hop) in enumerate(zip(param_keys, hops, strict=False)):
        if not _key_matches(pk, hop.key, el, i == len(hops) - 1) and not (
            path.choice_type and i == path.choice_step and pk == hop.key
        ):
            return False
        prefix = ".".join(path.path[: i + 1]) + "."
        wanted = {k[len(prefix) :]: v for k, v in path.criteria if k.startswith(prefix) and "." not in k[len(prefix) :]}
        if any(wanted.get(k, v) != v for k, v in hop.criteria):
            return False
    return True


def touched_elements(rp: ResourcePolicy, sp: SearchParam) -> list[CompiledElement] | None:
    """Encrypted elements the parameter reads; None when its expression is unknown."""
    paths = element_paths(sp)
    if paths is None:
        return None
    # Reference.display copies and Reference.identifier are read by no search parameter (only by
    # :text, _text and :identifier, which are refused)
    elements = [e for e in rp.content_elements if not e.searchless]
    return [e for e in elements if any(touches(p, e) for p in paths)]


def affected_params(rp: ResourcePolicy) -> dict[str, list[str]]:
    """For each encrypted element (by field id): the search parameters of its type that read it."""
    out: dict[str, list[str]] = {}
    for code, sp in sorted(search_params(rp.type).items()):
        for el in touched_elements(rp, sp) or []:
            out.setdefault(el.field_id, []).append(code)
    return out


def answerable(rp: ResourcePolicy, code: str) -> bool:
    """Whether the proxy can answer search parameter ``code`` on ``rp``'s type at all: it reads no
    encrypted element, or every encrypted element it reads has a blind index for it (the request guard
    refuses the rest, so a CapabilityStatement should not offer them). The closed defaults' catch-alls
    do not count: ``identifier`` stays offered for the listed systems, which are indexed."""
    sp = search_params(rp.type).get(code)
    if sp is None:
        return True  # a control parameter or one the server defines: not the proxy's to judge here
    touched = touched_elements(rp, sp)
    return touched is not None and all(any(s.param == code for s in el.indexes) for el in touched if el.closing is None)
