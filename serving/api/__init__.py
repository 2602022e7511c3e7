"""The REST gateway (FastAPI): `create_app()` in `serving.api.main`; run with
`uvicorn serving.api.main:create_app --factory` (`make api`)."""
