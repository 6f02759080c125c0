"""The moves of a job's record, as Lua scripts: each is checked and made in one step in Redis.

A transition happens only from the state the caller expects, and reaching a final state bumps
the run's counters exactly once, so a redelivered task can never count or bill a job twice.
The store (jobs/store.py) runs them; they stand apart from it so that the rules a job's
state changes by read as one piece.
"""

TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[1] then return state or '' end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', ARGV[3])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[7] ~= '' then redis.call('SREM', KEYS[3], ARGV[7]) end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[5], 1) end
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[6], 1) end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[2], 'finished', 1)
  local cost = tonumber(redis.call('HGET', KEYS[1], 'cost_micros') or '0')
  redis.call('HINCRBY', KEYS[2], 'cost_micros', cost)
end
return 'ok'
"""

# A final job taken back. With ARGV[4] == '1' (an attempt that was paid, and is paid again) its
# cost stays in the run's total and moves to the job's earlier attempts.
REOPEN = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'token', ARGV[3], 'next_token', '', 'error', '', 'reason', '')
redis.call('HDEL', KEYS[1], 'posted_at', 'wake_at', 'finished_at')
redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
redis.call('HINCRBY', KEYS[2], 'finished', -1)
local cost = math.floor(tonumber(redis.call('HGET', KEYS[1], 'cost_micros') or '0'))
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'prior_cost_micros', cost)
elseif cost > 0 then
  redis.call('HINCRBY', KEYS[2], 'cost_micros', -cost)
end
redis.call('HSET', KEYS[1], 'cost_micros', '0')
return 1
"""

# The claim before a POST: only the message holding the job's token may take it. Each claim is
# named (ARGV[3]): two copies of one message hold the same token, and a claim handed back and
# taken again by the other copy must not let the first one's last check pass.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'pending' then return state or '' end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 'submitting', 'updated_at', ARGV[2], 'claim', ARGV[3])
redis.call('HDEL', KEYS[1], 'posted_at')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'ok'
"""

# The last check before a POST, and the mark that it leaves: the job is still this claim's (the
# message's token and the claim's name), its run is not halted and its budget not stopped. Once
# `posted_at` is set the job is handed back only as a refused POST, by the claim that sent it.
POST = """
local got = redis.call('HMGET', KEYS[1], 'state', 'token', 'claim')
if got[1] ~= 'submitting' or got[2] ~= ARGV[1] or got[3] ~= ARGV[3] then return 'lost' end
local halt = redis.call('GET', KEYS[2])
if halt then return 'halted:' .. halt end
local stopped = redis.call('HGET', KEYS[3], 'stopped')
if stopped then return 'budget:' .. stopped end
redis.call('HSET', KEYS[1], 'posted_at', ARGV[2])
return 'ok'
"""

# A claimed submit that never left goes back to pending. A POST that left is handed back only
# when the service's answer proved nothing was created (ARGV[2] == '1'), and only by the claim
# that sent it (ARGV[4], the `posted_at` it marked): a hand-back tried again after its answer was
# lost must not undo another message's claim that has sent its own POST since. With ARGV[3] ==
# '1' the attempt does not count. 'gone': the job is not in Redis (it was lost with its run).
HAND_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HGET', KEYS[1], 'state') ~= 'submitting' then return 'kept' end
local posted = redis.call('HGET', KEYS[1], 'posted_at')
if posted and (ARGV[2] ~= '1' or posted ~= ARGV[4]) then return 'kept' end
redis.call('HSET', KEYS[1], 'state', 'pending', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'posted_at')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
return 'ok'
"""

# The next message's token is announced (and the job's due time moved to when it should run)
# before the message is published.
ANNOUNCE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'next_token', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return redis.call('HGET', KEYS[1], 'state')
"""

# A message may drive the job when it holds the current token or the announced next one; it
# then marks the job due by the end of its step lease and reads the whole record, in one trip.
BEGIN = """
local token = redis.call('HGET', KEYS[1], 'token')
if not token then return false end
if token ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'next_token') ~= ARGV[1] then return false end
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'next_token', '')
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

COMMIT = """
local token = redis.call('HGET', KEYS[1], 'token')
if token == ARGV[1] and redis.call('HGET', KEYS[1], 'next_token') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'token', ARGV[2], 'next_token', '')
end
return 1
"""
