import yaml, json, gzip, sys
src = sys.argv[1] if len(sys.argv) > 1 else 'ray.io_rayjobs.yaml'
d = yaml.safe_load(open(src))
v = [x for x in d['spec']['versions'] if x['name'] == 'v1'][0]
root = v['schema']['openAPIV3Schema']
unhandled = set()

def conv(n):
    if isinstance(n, list):
        return [conv(x) for x in n]
    if not isinstance(n, dict):
        return n
    out = {}
    for k, val in n.items():
        if k in ('properties', 'definitions', 'patternProperties'):
            out[k] = {pk: conv(pv) for pk, pv in val.items()}
        elif k in ('items', 'additionalProperties', 'not', 'anyOf', 'allOf', 'oneOf'):
            out[k] = conv(val)
        elif k.startswith('x-kubernetes-') or k == 'nullable':
            continue
        else:
            out[k] = val
    if n.get('x-kubernetes-int-or-string'):
        out.pop('type', None)
        out['anyOf'] = [{'type': 'integer'}, {'type': 'string'}]
    if n.get('nullable') and 'type' in out:
        out['type'] = [out['type'], 'null']
        if 'enum' in out: out['enum'] = list(out['enum']) + [None]
    if n.get('x-kubernetes-list-type') == 'set':
        out['uniqueItems'] = True
    for k in n:
        if k.startswith('x-kubernetes-') and k not in ('x-kubernetes-int-or-string', 'x-kubernetes-preserve-unknown-fields',
                'x-kubernetes-list-type', 'x-kubernetes-list-map-keys', 'x-kubernetes-map-type', 'x-kubernetes-validations'):
            unhandled.add(k)
    if n.get('x-kubernetes-preserve-unknown-fields'):
        out.setdefault('additionalProperties', True)
    elif 'properties' in n and 'additionalProperties' not in n:
        out['additionalProperties'] = False
    return out

s = conv(root)
s = {'$schema': 'http://json-schema.org/draft-07/schema#',
     '$id': 'https://ray.io/schemas/rayjob-v1.schema.json',
     'title': 'KubeRay RayJob (ray.io/v1)', **s}
s['properties']['apiVersion'] = {**s['properties']['apiVersion'], 'const': 'ray.io/v1'}
s['properties']['kind'] = {**s['properties']['kind'], 'const': 'RayJob'}
s['required'] = sorted(set(s.get('required', [])) | {'apiVersion', 'kind', 'metadata'})
print('unhandled x- keys:', unhandled)
txt = json.dumps(s, separators=(',', ':'), sort_keys=False)
open('rayjob.schema.json', 'w').write(txt)
with gzip.GzipFile('rayjob.schema.json.gz', 'wb', mtime=0) as f:
    f.write(txt.encode())
