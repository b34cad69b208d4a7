-- One admission of one key, atomic on the Redis server: the concurrency lease, the token
-- reservation and the request (GCRA) are each checked, and only if all three admit is any of
-- them changed. The same formulas as limits/gcra.rs and limits/bucket.rs, on Redis's clock
-- (microseconds), so that every replica reads the same time.
--
-- KEYS[1] requests: the GCRA's theoretical arrival time (string, microseconds)
-- KEYS[2] tokens:   hash { l = level, t = when (microseconds) }
-- KEYS[3] leases:   sorted set of lease ids scored by their expiry (milliseconds)
-- ARGV: 1 requests per minute (0: none), 2 burst, 3 tokens per minute (0: none),
--       4 token estimate, 5 max concurrency (0: none), 6 lease id, 7 lease ttl (ms),
--       8 mode (1: admit, 0: look only), 9.. leases this replica released whose removal may
--       not have arrived yet (removed first, so a released slot is free for the next request)
-- Returns { admitted (1/0), refused by (0 none, 1 requests, 2 tokens, 3 concurrency),
--           wait us, requests remaining, requests reset us, tokens remaining,
--           tokens reset us, tokens reserved }; -1 for a limit the key does not have.

if redis.replicate_commands then redis.replicate_commands() end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local rpm, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local estimate, max_conc = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, lease_ttl, admit = ARGV[6], tonumber(ARGV[7]), ARGV[8] == '1'
local MAX_DEBT_MINUTES = 10

local refused, wait = 0, 0

-- Concurrency: expired leases (their replica died) are dropped first.
local now_ms = math.floor(now / 1000)
if max_conc > 0 then
  for i = 9, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= max_conc then
    refused, wait = 3, 1000000
  end
end

-- Tokens: a bucket of one minute, refilled continuously; the level may be below zero after
-- an answer longer than its estimate.
local level, per_us, wanted = 0, 0, 0
if tpm > 0 then
  per_us = tpm / 60000000
  local state = redis.call('HMGET', KEYS[2], 'l', 't')
  level = tonumber(state[1]) or tpm
  local at = tonumber(state[2]) or now
  level = math.min(tpm, level + math.max(0, now - at) * per_us)
  wanted = math.min(estimate, tpm)
  if not admit then wanted = math.min(1, tpm) end
  if refused == 0 and level < wanted then
    refused, wait = 2, (wanted - level) / per_us
  end
end

-- Requests: GCRA. Admitted when the arrival time after this request is at most `burst`
-- intervals ahead of now.
local interval, tolerance, tat = 0, 0, now
if rpm > 0 then
  interval = 60000000 / rpm
  tolerance = interval * burst
  tat = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now)
  local ahead = tat + interval - now
  if refused == 0 and ahead > tolerance + 0.5 then
    refused, wait = 1, ahead - tolerance
  end
end

local admitted = refused == 0 and admit
local reserved = 0
if admitted then
  if max_conc > 0 then
    redis.call('ZADD', KEYS[3], now_ms + lease_ttl, lease)
    redis.call('PEXPIRE', KEYS[3], lease_ttl * 2)
  end
  if tpm > 0 then
    reserved = wanted
    level = level - wanted
    -- Formatted here: Lua's own conversion keeps 14 digits, and microseconds since 1970 have 16.
    redis.call('HSET', KEYS[2], 'l', string.format('%.3f', level), 't', string.format('%.0f', now))
    -- Gone when full again: an idle key costs no memory.
    redis.call('PEXPIRE', KEYS[2], math.ceil((tpm - level) / per_us / 1000) + 1000)
  end
  if rpm > 0 then
    tat = tat + interval
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end

local req_remaining, req_reset = -1, -1
if rpm > 0 then
  local ahead = tat - now
  req_remaining = math.floor((tolerance - ahead) / interval + 1e-6)
  req_remaining = math.max(0, math.min(burst, req_remaining))
  req_reset = math.ceil(ahead)
end
local tok_remaining, tok_reset = -1, -1
if tpm > 0 then
  tok_remaining = math.floor(math.max(0, level))
  tok_reset = math.ceil((tpm - level) / per_us)
end
if refused == 0 and not admit then wait = 0 end
return { admitted and 1 or 0, refused, math.ceil(wait), req_remaining, req_reset, tok_remaining, tok_reset, reserved }
