-- Replaces a token reservation with the tokens really used (refund or extra charge), on the
-- bucket admit.lua reserved from; the debt is capped at ten minutes of budget as in memory.
-- KEYS[1] tokens: hash { l = level, t = when (microseconds) }
-- ARGV: 1 tokens per minute, 2 reserved, 3 used

if redis.replicate_commands then redis.replicate_commands() end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tpm, reserved, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local per_us = tpm / 60000000
local state = redis.call('HMGET', KEYS[1], 'l', 't')
local level = tonumber(state[1]) or tpm
local at = tonumber(state[2]) or now
level = math.min(tpm, level + math.max(0, now - at) * per_us)
level = math.max(-10 * tpm, math.min(tpm, level + reserved - used))
redis.call('HSET', KEYS[1], 'l', string.format('%.3f', level), 't', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((tpm - level) / per_us / 1000) + 1000)
return 1
