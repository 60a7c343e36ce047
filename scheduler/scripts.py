"""The Lua scripts of a batch's write: claim its events, write it in one atomic step, renew and release claims."""

from __future__ import annotations

from dicomflow import keys

#: Claim each event of a batch (concurrent duplicates lose) and read its last run and, for a
#: series or study, the instances already handed to jobs. KEYS: per event its claim, run and
#: state key; ARGV: token, claim time (ms), then per event 1 if its state is wanted.
#: Replies per event: claimed (1/0), the run (or nil), the state's members.
#: Claims live in memory only: not written to the append-only file (nor to replicas). A
#: claim is a lock of a request in flight, which a Redis restart ends anyway; two AOF
#: entries per event (the claim and its deletion) were Redis writing to disk for nothing.
CLAIM = """
redis.set_repl(redis.REPL_NONE)
local reply = {}
for i = 1, #KEYS, 3 do
  local claimed = redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
  local members = {}
  if ARGV[2 + (i + 2) / 3] == '1' then members = redis.call('SMEMBERS', KEYS[i + 2]) end
  reply[#reply + 1] = claimed
  reply[#reply + 1] = redis.call('GET', KEYS[i + 1])
  reply[#reply + 1] = members
end
return reply
"""

#: Run a batch's commands (ARGV[2]: a MessagePack array of commands, each an array of words)
#: as one atomic script, then delete the claims this request holds (KEYS; only those: compare
#: the token in ARGV[1]). One reply for the batch, and one argument to encode instead of ~100
#: per event (redis-py's encoding of those was a fifth of the scheduler's CPU). The batch's
#: commands reach the append-only file; the claims' deletion does not (see CLAIM).
#: Nothing is written (reply -1) unless every claim is still this request's: a request whose
#: claim expired while its callbacks ran must not enqueue next to the one that took it over.
#: ARGV[3] (optional, MessagePack): guards {key, field, value}; reply 0, nothing written, if a
#: hash field no longer holds the value (a push that received an instance since it was read).
#: The pseudo-command PUSH opens or extends a push (scheduler/pushes.py): key, members key,
#: a new push id, now, due time, the template event ('' when sent earlier in the batch), member.
APPLY = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) ~= ARGV[1] then return -1 end
end
if ARGV[3] then
  for _, guard in ipairs(cmsgpack.unpack(ARGV[3])) do
    if redis.call('HGET', guard[1], guard[2]) ~= guard[3] then return 0 end
  end
end
for _, command in ipairs(cmsgpack.unpack(ARGV[2])) do
  if command[1] == 'PUSH' then
    local key = command[2]
    if command[4] ~= '' then redis.call('HSETNX', key, 'id', command[4]) end
    redis.call('HSETNX', key, 'first', command[5])
    if command[7] ~= '' then redis.call('HSETNX', key, 'event', command[7]) end
    redis.call('HSET', key, 'last', command[5])
    redis.call('HINCRBY', key, 'count', 1)
    if command[8] ~= '' then redis.call('SADD', command[3], command[8]) end
    redis.call('ZADD', '""" + keys.PUSHES_DUE + """', command[6], key)
  else
    redis.call(unpack(command))
  end
end
redis.set_repl(redis.REPL_NONE)
for _, key in ipairs(KEYS) do
  redis.call('DEL', key)
end
return 1
"""

#: Extend the claims this request still holds (KEYS) by ARGV[2] ms while its callbacks run.
RENEW = """
redis.set_repl(redis.REPL_NONE)
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 1
"""

#: Delete the claims this request holds (and only those: compare the token).
RELEASE = """
redis.set_repl(redis.REPL_NONE)
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""
