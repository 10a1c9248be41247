-- Argo CD health check of a MoEDeployment (moe.craft.dev/v1alpha1). Argo CD runs it with the object
-- as `obj` (gopher-lua, Lua 5.1) and reads {status, message}. Conditions are read by type, never by
-- position. Install: docs/gitops.md. Tested by tests/argocd_health.rs on every fixture of
-- health_test.yaml (the layout of Argo CD's resource_customizations).
local hs = {}

local function condition(type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.message
  if text == nil or text == "" then
    text = fallback
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason .. ": " .. text
  end
  return text
end

local generation = obj.metadata.generation or 0
local observed = nil
if obj.status ~= nil then
  observed = obj.status.observedGeneration
end
if observed == nil or observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

-- A spec the operator refuses, a failed EP rank, or an EP group the scheduler cannot place whole
-- (gang scheduling gave up: the condition says how many GPUs are missing).
local degraded = condition("Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Degraded")
  return hs
end
local unschedulable = condition("Unschedulable")
if is_true(unschedulable) then
  hs.status = "Degraded"
  hs.message = describe(unschedulable, "The worker group cannot be scheduled")
  return hs
end

-- Paused on purpose: workers scaled to zero, plan and status kept.
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = describe(condition("Suspended"), "Suspended: workers scaled to zero, plan kept")
  return hs
end

local progressing = condition("Progressing")
if is_true(progressing) then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Rolling out")
  return hs
end

local ready = condition("Ready")
if is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the MoEDeployment to become Ready")
return hs
