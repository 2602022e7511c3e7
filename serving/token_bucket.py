"""The token bucket both rate limits use (writes: serving/api/rate_limit.py; reads: serving/recommender.py's
read script), as a piece of Lua that scripts embed, so the arithmetic lives in one place.

Before the piece, the script sets `bucket` (the key), `rate` (tokens a second) and `burst` (the bucket's size)
and declares `allowed` and `wait`; after it, `allowed` is 1 (a token taken) or 0, and `wait` the seconds until
a token is back. Redis' own clock, so the workers' clocks do not matter.
"""

TOKEN_BUCKET_STEP = """
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local state = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  allowed, wait = 0, (1 - tokens) / rate
  if tokens >= 1 then
    tokens, allowed, wait = tokens - 1, 1, 0
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 1)
"""


# The step as a script of its own: KEYS[1] the bucket; ARGV: tokens a second, bucket size. Returns {allowed (0/1),
# seconds to wait}. The write limit's round trip, and a read's on a Redis Cluster (serving/list_reader.py).
TOKEN_BUCKET = """
local bucket, rate, burst = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local allowed, wait
""" + TOKEN_BUCKET_STEP + """
return {allowed, tostring(wait)}
"""


def read_bucket_key(key_prefix: str, api_key_name: str) -> str:
    return f"{key_prefix}ratelimit-read:{api_key_name}"


def write_bucket_key(key_prefix: str, api_key_name: str) -> str:
    return f"{key_prefix}ratelimit:{api_key_name}"
