-- spec.rollout.action = {name = "promote", id = <new>}: the operator applies each id once and records it in
-- status.actions. The id is unique per click: the time and the generation (every action bumps it).
local os = require("os")
if obj.spec.rollout == nil then
  obj.spec.rollout = {}
end
local generation = 0
if obj.metadata.generation ~= nil then
  generation = obj.metadata.generation
end
obj.spec.rollout.action = {}
obj.spec.rollout.action.name = "promote"
obj.spec.rollout.action.id = "argocd-" .. os.date("!%Y%m%dt%H%M%Sz") .. "-g" .. tostring(generation)
return obj
