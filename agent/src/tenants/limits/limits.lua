-- Admission of one request of one tenant, atomically, in one round trip.
-- KEYS[1]: requests window (hash: second -> count)
-- KEYS[2]: tokens window (hash: second -> tokens)
-- KEYS[3]: running requests (sorted set: request id -> expiry in ms)
-- ARGV: requests limit, tokens limit, concurrency limit (0 = none), token
--       cost, request id, slot lifetime in ms
-- The clock is the server's, so that every agent counts the same minute.
-- Returns {admitted (1/0), refused by (0 none, 1 requests, 2 tokens,
-- 3 concurrency), requests used, requests reset ms, tokens used, tokens
-- reset ms, retry after ms, second of admission}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = math.floor(now / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, id, ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])

-- Sum of the live buckets, dropping expired ones; the live buckets in
-- ascending order.
local function window(key)
  local all = redis.call('HGETALL', key)
  local used, live = 0, {}
  for i = 1, #all, 2 do
    local s = tonumber(all[i])
    if s + 60 <= sec then
      redis.call('HDEL', key, all[i])
    else
      local n = tonumber(all[i + 1])
      used = used + n
      table.insert(live, {s, n})
    end
  end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  return used, live
end

local function reset(live)
  if #live == 0 then return 0 end
  return (live[1][1] + 60) * 1000 - now
end

-- How long until `need` units have left the window.
local function wait(live, need, limit, c)
  if c > limit then return 60000 end
  local freed = 0
  for _, b in ipairs(live) do
    freed = freed + b[2]
    if freed >= need then return (b[1] + 60) * 1000 - now end
  end
  return 60000
end

local r_used, r_live, t_used, t_live = 0, {}, 0, {}
if rpm > 0 then r_used, r_live = window(KEYS[1]) end
if tpm > 0 then t_used, t_live = window(KEYS[2]) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)

local refused, retry = 0, 0
if rpm > 0 and r_used + 1 > rpm then
  refused, retry = 1, wait(r_live, r_used + 1 - rpm, rpm, 1)
elseif tpm > 0 and t_used + cost > tpm then
  refused, retry = 2, wait(t_live, t_used + cost - tpm, tpm, cost)
elseif conc > 0 and redis.call('ZCARD', KEYS[3]) >= conc then
  refused, retry = 3, 1000
end
if refused ~= 0 then
  return {0, refused, r_used, reset(r_live), t_used, reset(t_live), retry, sec}
end

if rpm > 0 then
  redis.call('HINCRBY', KEYS[1], sec, 1)
  redis.call('PEXPIRE', KEYS[1], 61000)
  r_used = r_used + 1
  if #r_live == 0 then r_live = {{sec, 1}} end
end
if tpm > 0 then
  redis.call('HINCRBY', KEYS[2], sec, cost)
  redis.call('PEXPIRE', KEYS[2], 61000)
  t_used = t_used + cost
  if #t_live == 0 then t_live = {{sec, cost}} end
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, id)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, 0, r_used, reset(r_live), t_used, reset(t_live), 0, sec}
