"""One router per resource; `serving.api.main.api_router` includes them all."""
