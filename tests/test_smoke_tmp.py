from tests.conftest import s3_uri, load_event

def test_smoke(s3, import_handler):
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE="16384")
    for _ in range(3):
        r = mod.handler(load_event("http-api-predict"), None)
        assert r["statusCode"] == 200, r
    gets = s3.object_gets("lazyserve-models", "digits/digits.safetensors")
    print([g.range for g in gets], [g.headers.get("if-match") for g in gets])
    assert mod.model.loads_started == 1
