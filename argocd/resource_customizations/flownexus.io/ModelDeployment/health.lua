local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end
if obj.metadata.generation ~= nil and (obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c.status
  end
end
local phase = obj.status.phase
hs.message = obj.status.message or phase
if phase == "Failed" or phase == "RolledBack" or conditions["Degraded"] == "True" then
  hs.status = "Degraded"
elseif conditions["Paused"] == "True" and conditions["Ready"] ~= "True" then
  hs.status = "Suspended"
elseif conditions["Ready"] == "True" then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
return hs
